"""verl: the pm / cpm kl_penalty types give the exact shaped rewards, in-process and in Ray workers.

Runs in an environment with verl installed (``make test-integrations``); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import apply_kl_penalty

from pmrlhf.integrations import verl as pm_verl
from pmrlhf.regularizers import make_regularizer


def shaped_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Log-probs around log α so that some tokens are meaningful for cpm and some are not."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = 4, 6
    logp = -3.0 * torch.rand(batch, length, generator=generator)
    ref = -4.0 * torch.rand(batch, length, generator=generator)
    lengths = torch.tensor([6, 4, 1, 3])
    mask = (torch.arange(length) < lengths.unsqueeze(1)).float()
    scores = torch.zeros(batch, length)
    scores[torch.arange(batch), lengths - 1] = torch.randn(batch, generator=generator)
    return {
        "old_log_probs": logp,
        "ref_log_prob": ref,
        "response_mask": mask,
        "token_level_scores": scores,
    }


def expected_rewards(tensors, name: str, beta: float, alpha: float | None) -> torch.Tensor:
    regularizer = make_regularizer(name, beta=beta, alpha=alpha)
    mask = tensors["response_mask"].bool()
    return tensors["token_level_scores"] + regularizer.token_rewards(
        tensors["old_log_probs"], tensors["ref_log_prob"], mask
    )


@pytest.mark.parametrize(
    ("spec", "name", "alpha"),
    [("pm", "pm", None), ("cpm:0.1", "cpm", 0.1), ("cpm:0.5", "cpm", 0.5)],
)
def test_apply_kl_penalty_gives_exact_shaped_rewards(spec, name, alpha):
    pm_verl.install()
    assert pm_verl.installed()
    beta = 0.8
    tensors = shaped_batch()
    if alpha is not None:  # both branches of cpm occur among the real tokens
        meaningful = tensors["ref_log_prob"] > torch.log(torch.tensor(alpha))
        real = tensors["response_mask"].bool()
        assert (meaningful & real).any() and (~meaningful & real).any()
    data = DataProto.from_dict(tensors={k: v.clone() for k, v in tensors.items()})
    data, metrics = apply_kl_penalty(
        data, core_algos.FixedKLController(kl_coef=beta), kl_penalty=spec
    )
    torch.testing.assert_close(
        data.batch["token_level_rewards"], expected_rewards(tensors, name, beta, alpha)
    )
    assert metrics["actor/reward_kl_penalty_coeff"] == beta


def test_native_types_keep_verl_meaning():
    pm_verl.install()
    tensors = shaped_batch(1)
    lp, ref = tensors["old_log_probs"], tensors["ref_log_prob"]
    torch.testing.assert_close(core_algos.kl_penalty(lp, ref, "kl"), lp - ref)
    k3 = core_algos.kl_penalty(lp, ref, "low_var_kl")
    assert (k3 >= 0).all()
    with pytest.raises(NotImplementedError):  # unknown types still reach verl's own error
        core_algos.kl_penalty(lp, ref, "nonsense")
    with pytest.raises(ValueError, match="alpha"):  # a pmrlhf type with a bad α is explained
        core_algos.kl_penalty(lp, ref, "cpm:1.5")


def test_worker_hook_installs_penalty_in_ray_actor():
    ray = pytest.importorskip("ray")
    tensors = shaped_batch(2)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "pmrlhf.integrations.verl.install"},
    )
    try:

        @ray.remote(num_cpus=1)
        class Shaper:
            def installed(self) -> bool:
                from pmrlhf.integrations.verl import installed

                return installed()

            def rewards(self, tensors, spec, beta):
                from verl import DataProto
                from verl.trainer.ppo import core_algos
                from verl.trainer.ppo.ray_trainer import apply_kl_penalty

                data = DataProto.from_dict(tensors=tensors)
                data, _ = apply_kl_penalty(
                    data, core_algos.FixedKLController(kl_coef=beta), kl_penalty=spec
                )
                return data.batch["token_level_rewards"]

        actor = Shaper.remote()
        assert ray.get(actor.installed.remote())
        got = ray.get(actor.rewards.remote(tensors, "cpm:0.1", 0.5))
    finally:
        ray.shutdown()
    torch.testing.assert_close(got, expected_rewards(tensors, "cpm", 0.5, 0.1))


def example_overrides() -> list[str]:
    """The Hydra overrides of examples/verl_pm.sh, with its shell variables filled in."""
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "verl_pm.sh"
    values = {
        "PENALTY": "cpm:0.1",
        "BETA": "1.0",
        "MODEL": "m",
        "TRAIN": "t.parquet",
        "VAL": "v.parquet",
    }
    overrides = []
    for line in script.read_text().splitlines():
        match = re.fullmatch(r"\s+(\+?[a-z_.]+=\S+?)\s*\\?", line)
        if match:
            override = re.sub(r'"\$(\w+)"', lambda m: values[m.group(1)], match.group(1))
            overrides.append(override)
    return overrides


def test_example_overrides_compose_with_verl_config():
    """examples/verl_pm.sh names real verl 0.9 options, and they land where verl reads them."""
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir

    overrides = example_overrides()
    assert len(overrides) >= 10
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    assert config.algorithm.use_kl_in_reward is True
    assert config.algorithm.kl_penalty == "cpm:0.1"
    assert config.algorithm.kl_ctrl.type == "fixed"
    assert config.algorithm.norm_adv_by_std_in_grpo is False
    hook = config.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook
    module, _, function = hook.rpartition(".")
    assert getattr(__import__(module, fromlist=[function]), function) is pm_verl.install
