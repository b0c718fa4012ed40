"""Run a `pmrlhf sft` or `pmrlhf rm` command line that crashes on its N-th training-loss call.

    python crash_on_loss.py N sft --model ... --save-every 2      (N = 0: never crash)

Each process counts its own calls, so under `accelerate launch` every rank stops at the same
micro-batch, as a killed job would.
"""

import sys

import pmrlhf.reward
import pmrlhf.sft
from pmrlhf.cli import main


class CrashOnCall:
    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.fn(*args, **kwargs)


crash_call = int(sys.argv[1])
pmrlhf.sft.sft_loss = CrashOnCall(pmrlhf.sft.sft_loss, crash_call)
pmrlhf.reward.ranking_loss = CrashOnCall(pmrlhf.reward.ranking_loss, crash_call)
sys.exit(main(sys.argv[2:]))
