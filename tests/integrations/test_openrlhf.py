"""OpenRLHF: the shaped reward through its k1 path equals verl's and pmrlhf's own.

OpenRLHF does not install with its dependencies on a CPU machine (flash-attn), so it is installed
with ``--no-deps`` and its ``models/utils.py`` is loaded by file path, as OpenRLHF's own tests do.
Runs in the verl test environment (``make test-integrations``); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pmrlhf.integrations import openrlhf as pm_openrlhf
from pmrlhf.regularizers import make_regularizer


def openrlhf_root() -> Path:
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture()
def utils_module():
    pytest.importorskip("deepspeed")  # imported at the top of OpenRLHF's models/utils.py
    path = openrlhf_root() / "models" / "utils.py"
    return pm_openrlhf.load_module(path, "_pmrlhf_openrlhf_models_utils")


def tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, length = 4, 6
    logp = -3.0 * torch.rand(batch, length, generator=generator)
    logp[0, 0] = -14.0  # below OpenRLHF's k1 clamp at -10: the PM penalty is not clamped
    ref = -4.0 * torch.rand(batch, length, generator=generator)
    lengths = torch.tensor([6, 4, 1, 3])
    mask = torch.arange(length) < lengths.unsqueeze(1)
    reward = torch.randn(batch, generator=generator)
    return logp, ref, mask, reward, lengths


@pytest.mark.parametrize(("spec", "name", "alpha"), [("pm", "pm", None), ("cpm:0.1", "cpm", 0.1)])
def test_shaped_reward_equals_pmrlhf_and_verl(utils_module, spec, name, alpha):
    logp, ref, mask, reward, lengths = tensors()
    beta = 0.6
    original = utils_module.compute_approx_kl
    pm_openrlhf.install(spec, module=utils_module)
    assert utils_module.compute_approx_kl is not original

    kl = utils_module.compute_approx_kl(logp, ref, kl_estimator="k1")
    shaped = utils_module.compute_reward(reward, beta, kl, action_mask=mask)

    # pmrlhf's own shaped reward: −β p_t on every real token, plus r at the last one.
    expected = make_regularizer(name, beta=beta, alpha=alpha).token_rewards(logp, ref, mask)
    expected[torch.arange(len(lengths)), lengths - 1] += reward
    torch.testing.assert_close(shaped * mask, expected)
    if name == "pm":  # OpenRLHF's own k1 would clamp this token's value at -10
        assert kl[0, 0] == logp[0, 0] < -10

    # Other estimators are still OpenRLHF's own; re-installing does not stack.
    torch.testing.assert_close(
        utils_module.compute_approx_kl(logp, ref, kl_estimator="k2"),
        original(logp, ref, kl_estimator="k2"),
    )
    pm_openrlhf.install(spec, module=utils_module)
    torch.testing.assert_close(utils_module.compute_approx_kl(logp, ref, kl_estimator="k1"), kl)

    verl = pytest.importorskip("verl")
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty

    from pmrlhf.integrations import verl as pm_verl

    pm_verl.install()
    scores = torch.zeros_like(logp)
    scores[torch.arange(len(lengths)), lengths - 1] = reward
    data = verl.DataProto.from_dict(
        tensors={
            "old_log_probs": logp,
            "ref_log_prob": ref,
            "response_mask": mask.float(),
            "token_level_scores": scores,
        }
    )
    data, _ = apply_kl_penalty(data, core_algos.FixedKLController(kl_coef=beta), kl_penalty=spec)
    torch.testing.assert_close(shaped * mask, data.batch["token_level_rewards"])


def test_install_reads_environment(utils_module, monkeypatch):
    original = utils_module.compute_approx_kl
    monkeypatch.delenv(pm_openrlhf.ENV_VAR, raising=False)
    pm_openrlhf.install(module=utils_module)  # nothing asked for: nothing changes
    assert utils_module.compute_approx_kl is original
    monkeypatch.setenv(pm_openrlhf.ENV_VAR, "pm")
    pm_openrlhf.install(module=utils_module)
    logp, ref, *_ = tensors(1)
    torch.testing.assert_close(utils_module.compute_approx_kl(logp, ref), logp)
    with pytest.raises(ValueError, match="unknown regularizer"):
        pm_openrlhf.install("entropy", module=utils_module)
