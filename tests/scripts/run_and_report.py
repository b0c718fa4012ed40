"""Run a ``pmrlhf`` command (the arguments) and, at exit, record how accelerate ran it.

Each process writes ``<RUN_REPORT>/rank<N>.json``: the distributed type, the number of
processes and, under DeepSpeed, the ZeRO stage, so that a test can tell that a launch really
took the path it asked for.
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

from accelerate import state


def _report() -> None:
    folder = os.environ.get("RUN_REPORT")
    if not folder or not state.AcceleratorState._shared_state:
        return
    current = state.AcceleratorState()
    plugin = current.deepspeed_plugin if current.distributed_type.value == "DEEPSPEED" else None
    report = {
        "distributed_type": current.distributed_type.value,
        "num_processes": current.num_processes,
        "zero_stage": None if plugin is None else plugin.zero_stage,
    }
    Path(folder, f"rank{current.process_index}.json").write_text(json.dumps(report))


atexit.register(_report)
sys.argv = ["pmrlhf", *sys.argv[1:]]
runpy.run_module("pmrlhf", run_name="__main__", alter_sys=True)
