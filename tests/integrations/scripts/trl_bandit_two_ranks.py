"""Run the TRL bandit with the pmrlhf plug-in on every rank of an `accelerate launch`.

Usage: trl_bandit_two_ranks.py MODEL_DIR OUT_DIR REGULARIZER. Each rank writes
OUT_DIR/rank<i>.json with its TV to the closed form and its learned distribution.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl_bandit import run_trl_bandit


def main() -> None:
    model_dir, out_dir, regularizer = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    # 16 completions per step split over the two ranks: each group spans both processes.
    tv, _, optimum, learned, trainer = run_trl_bandit(
        model_dir, out_dir / "run", regularizer, "rloo", per_device=8
    )
    rank = trainer.accelerator.process_index
    result = {
        "processes": trainer.accelerator.num_processes,
        "tv": tv,
        "learned": learned.tolist(),
        "optimum": optimum.tolist(),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    # end the process group, then leave without running C++ static destructors: at interpreter
    # exit, threads that TRL's stack leaves running can still abort a finished process
    # ("terminate called without an active exception", exit -6) after its result is written
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
