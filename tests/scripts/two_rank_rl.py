"""Run two RL steps under `accelerate launch` and save each rank's parameters."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.trainer import RLTrainer

policy, out = sys.argv[1], Path(sys.argv[2])
config = RLConfig(
    policy=policy,
    reward=str(Path(__file__).with_name("reward_fns.py")) + ":likes_tea",
    algo="rloo",
    regularizer="kl",
    beta=0.1,
    max_steps=2,
    prompts_per_step=2,
    samples_per_prompt=2,
    max_new_tokens=4,
    lr=1e-2,
    output_dir=str(out / "run"),
    quiet=True,
)
trainer = RLTrainer(
    config, prompts=["Which drink do you prefer ?", "Which season do you like best ?"]
)
trainer.train()
rank = trainer.accelerator.process_index
state = trainer.accelerator.unwrap_model(trainer.policy).state_dict()
save_file(
    {k: v.detach().clone().contiguous() for k, v in state.items()},
    str(out / f"rank{rank}.safetensors"),
)
torch.distributed.barrier() if torch.distributed.is_initialized() else None
# end the process group before exit, as `pmrlhf` does: left to interpreter exit, gloo's threads
# can abort a finished process
trainer.accelerator.end_training()
