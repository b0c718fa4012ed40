"""Decode with a policy sharded by FSDP2 over 2 CPU processes whose responses end at different steps.

Run through ``fsdp_on_cpu.py`` (so that accelerate really shards the model):

    accelerate launch --config_file configs/accelerate/fsdp.yaml ... fsdp_on_cpu.py \
        sharded_decoding.py MODEL_DIR OUT_DIR

Rank 0 may stop at its first token (only EOS is allowed); rank 1 must run to ``max_new_tokens``.
Every forward of a sharded model all-gathers its weights, so a rank that left the decoding loop
early would leave the other waiting forever. Each rank decodes greedily with both decoders and
writes ``rank<N>.json``: its responses, and the responses of an unsharded copy of the model with
the same settings.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pmrlhf.models import load_causal_lm, load_tokenizer
from pmrlhf.rl.rollout import DECODERS, generate

MAX_NEW_TOKENS = 6


def main(model_dir: str, out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.FSDP, accelerator.distributed_type
    rank = accelerator.process_index
    tokenizer = load_tokenizer(model_dir)
    plain = load_causal_lm(model_dir).eval()
    model = load_causal_lm(model_dir)
    # FSDP2 in accelerate prepares a model only together with its optimizer
    sharded, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    sharded.eval()
    prompts = ["Which drink do you prefer ?", "Which season do you like best ?"]
    if rank == 0:  # only EOS allowed: every row ends at its first token
        settings = {"allowed_token_ids": [tokenizer.eos_token_id]}
    else:  # EOS blocked until the last token: every row runs to max_new_tokens
        settings = {"min_new_tokens": MAX_NEW_TOKENS}
    report = {}
    for decoder in DECODERS:
        outputs = {}
        for name, model, is_sharded in (("sharded", sharded, True), ("plain", plain, False)):
            torch.manual_seed(0)
            rollout = generate(model, tokenizer, prompts, MAX_NEW_TOKENS, top_k=1,
                               decoder=decoder, sharded=is_sharded, **settings)  # fmt: skip
            outputs[name] = {
                "ids": rollout.response_ids.tolist(),
                "lengths": rollout.response_mask.sum(-1).tolist(),
            }
        report[decoder] = outputs
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
