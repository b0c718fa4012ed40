"""Run a ``pmrlhf`` command through accelerate's FSDP2 code path on CPU processes.

accelerate 1.15 turns ``distributed_type: FSDP`` into FSDP only for accelerator devices; on CPU
processes it silently keeps ``MULTI_CPU`` (DDP), although torch 2.13's ``fully_shard`` works
with gloo (docs/distributed.md, "FSDP on CPU"). This launcher gives accelerate's state the
distributed type and FSDP plugin it would have on GPUs, and changes nothing else: preparing,
sharding, gathering state dicts and (sharded) checkpoints all run accelerate's and torch's own
FSDP2 code. Use it under ``accelerate launch --config_file configs/accelerate/fsdp.yaml``:

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
        --mixed_precision no tests/scripts/fsdp_on_cpu.py sft --model ... --data ...

A first argument ending in ``.py`` runs that script instead of ``pmrlhf``, under the same state.
With ``FSDP_ON_CPU_REPORT`` set to a folder, each rank writes ``rank<N>.json`` there at exit:
the distributed type and FSDP version it ran with.
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


def _report() -> None:
    folder = os.environ.get("FSDP_ON_CPU_REPORT")
    if not folder or not state.AcceleratorState._shared_state:
        return
    current = state.AcceleratorState()
    plugin = getattr(current, "fsdp_plugin", None)
    report = {
        "distributed_type": current.distributed_type.value,
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "num_processes": current.num_processes,
    }
    Path(folder, f"rank{current.process_index}.json").write_text(json.dumps(report))


state.AcceleratorState.__init__ = _fsdp_on_cpu
atexit.register(_report)
if len(sys.argv) > 1 and sys.argv[1].endswith(".py"):
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    sys.argv = ["pmrlhf", *sys.argv[1:]]
    runpy.run_module("pmrlhf", run_name="__main__", alter_sys=True)
