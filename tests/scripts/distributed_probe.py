"""Report how accelerate set up this process: one JSON file per rank.

Run under ``accelerate launch``; it builds the Accelerator the way ``pmrlhf sft``/``rm`` do and
prepares a small module, then writes ``<out>/rank<N>.json`` with the distributed type, the
process count and the class of the prepared module.
"""

import json
import sys
from pathlib import Path

import torch

from pmrlhf.sft import SFTConfig
from pmrlhf.training import make_accelerator

out = Path(sys.argv[1])
accelerator = make_accelerator(SFTConfig(model="unused", data="unused", dtype="fp32"))
module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
prepared = accelerator.prepare(module)
report = {
    "distributed_type": str(accelerator.distributed_type.value),
    "num_processes": accelerator.num_processes,
    "process_index": accelerator.process_index,
    "prepared_class": type(prepared).__name__,
    "local_parameter_elements": sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in prepared.parameters()
    ),
}
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
accelerator.wait_for_everyone()
# end the process group before exit, as `pmrlhf` does
accelerator.end_training()
