"""The compute floor of a pmrlhf RL step: its matmul FLOPs, and this machine's peak matmul rate.

``floor seconds = matmul FLOPs of the step ÷ peak matmul FLOP/s``: no implementation on this
machine, in this dtype and thread count, can run the step's matrix products faster. A step
time as a multiple of its floor (``step_over_floor``) says how much is left to gain; TRL's step
time over the floor says how far ahead of TRL pmrlhf could be by arithmetic alone.

Only matrix products count (``2 × multiply-adds``): the linear layers, the LM head and the
attention products ``q·kᵀ`` and ``p·v``. Everything else — embedding lookups, norms, RoPE,
activations, softmax, log-softmax over the vocabulary, the loss, the gradient clip and the
optimizer — is left out; it is memory-bound and small next to the matmuls for any model worth
timing, and it has no well-defined peak rate to divide by.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ModelShape",
    "attention_flops",
    "forward_flops",
    "linear_flops_per_token",
    "lm_head_flops",
    "measure_peak_matmul",
    "peak_shapes",
    "rl_step_flops",
]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: ``layers`` blocks of attention (``heads`` query heads and
    ``kv_heads`` key/value heads of ``hidden // heads`` dims) and a gated MLP of width
    ``intermediate``; an LM head over ``vocab`` tokens.

    ``tied_embeddings`` does not change the count: the LM head is a matmul whether or not its
    weight is the input embedding, and the embedding itself is a lookup. It is kept so that a
    shape describes the model fully.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers ``LlamaConfig`` (or any config with the same names)."""
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


def linear_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of all the decoder blocks' linear layers for one token (no LM head).

    Per block: q and o projections ``hidden × heads·head_dim``, k and v projections
    ``hidden × kv_heads·head_dim``, and the gated MLP's gate, up and down projections
    ``hidden × intermediate``.
    """
    q_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    per_block = 2 * shape.hidden * q_width + 2 * shape.hidden * kv_width
    per_block += 3 * shape.hidden * shape.intermediate
    return 2 * shape.layers * per_block


def lm_head_flops(shape: ModelShape, positions: int) -> int:
    """FLOPs of the LM head applied at ``positions`` positions (summed over the batch)."""
    return 2 * shape.hidden * shape.vocab * positions


def attention_flops(shape: ModelShape, query_key_pairs: int) -> int:
    """FLOPs of ``q·kᵀ`` and ``p·v`` over all layers and query heads, for ``query_key_pairs``
    (query, key) pairs summed over the batch.

    Each pair costs ``2·head_dim`` for its score and ``2·head_dim`` for its share of the output.
    Grouped key/value heads change the projections, not this: every query head attends. The
    pairs are the ones a kernel computes: a full ``L × L`` square for a length-``L`` forward with
    a causal mask, as the eager and masked SDPA paths do (a causal-aware kernel skips about half
    of them; for the models benchmarked here attention is a few percent of the step).
    """
    return 4 * shape.layers * shape.heads * shape.head_dim * query_key_pairs


def forward_flops(
    shape: ModelShape,
    sequences: int,
    length: int,
    logits_positions: int,
    attention: bool = True,
) -> int:
    """One forward over ``sequences`` sequences of ``length`` tokens with no cache, the LM head
    applied at the last ``logits_positions`` positions of each (``logits_to_keep``)."""
    flops = sequences * length * linear_flops_per_token(shape)
    flops += lm_head_flops(shape, sequences * logits_positions)
    if attention:
        flops += attention_flops(shape, sequences * length * length)
    return flops


def generation_flops(
    shape: ModelShape,
    sequences: int,
    prompt_tokens: int,
    new_tokens: int,
    attention: bool = True,
    prompts: int | None = None,
) -> int:
    """Sampling ``new_tokens`` tokens after ``prompt_tokens`` prompt tokens with a KV cache.

    The prefill runs each of the ``prompts`` distinct prompts once (default: one per sequence;
    the lean decoder shares a prompt's keys and values among its responses) and applies the LM
    head at its last position only; it yields the first token. Each of the ``new_tokens − 1`` decoding steps then runs one token per
    sequence with the LM head, attending to the ``prompt_tokens + t`` cached positions at step
    ``t``. Hugging Face ``generate`` stops after the last token is sampled, without a forward
    over it. A static cache (compiled CUDA decoding) attends to every slot of the cache, real or
    not; this counts only the real ones, the least any decoder must compute.
    """
    if new_tokens < 1:
        return 0
    distinct = sequences if prompts is None else prompts
    flops = forward_flops(shape, distinct, prompt_tokens, 1, attention)
    steps = new_tokens - 1
    flops += sequences * steps * (linear_flops_per_token(shape) + lm_head_flops(shape, 1))
    if attention:
        keys = steps * prompt_tokens + steps * (steps + 1) // 2  # Σ_{t=1}^{steps} (P + t)
        flops += attention_flops(shape, sequences * keys)
    return flops


def rl_step_flops(
    shape: ModelShape,
    completions: int,
    prompt_tokens: int,
    new_tokens: int,
    reference: bool,
    attention: bool = True,
    prompts: int | None = None,
) -> dict[str, int]:
    """Matmul FLOPs of one pmrlhf step with one epoch over one minibatch (``ppo_epochs=1``,
    ``minibatches=1``), per phase, keyed like the trainer's ``time_<phase>`` metrics, plus
    ``total``.

    ``completions`` = prompts per step × samples per prompt, each ``prompt_tokens`` +
    ``new_tokens`` tokens long. Phases:

    - ``generate``: :func:`generation_flops`, whose prefill covers ``prompts`` distinct prompts
      (default ``completions``);
    - ``reference`` (only when ``reference``: kl and cpm load one, pm does not): one no-grad
      forward over the whole sequences with the LM head on the ``new_tokens + 1`` last positions
      (:func:`pmrlhf.rl.rollout.response_logits`);
    - ``policy_forward``: the same forward of the policy, with its graph; in one-pass mode it is
      both the old log-probs and the loss's forward, so it runs once;
    - ``backward``: twice the policy forward, the gradients with respect to each matmul's input
      and to its weight. Nothing is subtracted: the embedding is trained, so the first block
      needs its input gradient too, and the LM head's gradient covers all its positions.

    No critic (RLOO, GRPO and REINFORCE++ have none). With ``attention=False`` the attention
    products are left out, which is what ``torch.utils.flop_counter`` sees on a CPU, where it
    has no formula for the fused SDPA kernel.
    """
    logits = new_tokens + 1
    length = prompt_tokens + new_tokens
    policy = forward_flops(shape, completions, length, logits, attention)
    phases = {
        "generate": generation_flops(
            shape, completions, prompt_tokens, new_tokens, attention, prompts
        )
    }
    if reference:
        phases["reference"] = policy
    phases["policy_forward"] = policy
    phases["backward"] = 2 * policy
    phases["total"] = sum(phases.values())
    return phases


# ---------------------------------------------------------------------------------- peak rate
def peak_shapes(
    device: str, tokens: int, hidden: int, intermediate: int
) -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` products timed for the peak: the step's MLP product (``tokens`` rows
    of ``hidden`` times ``hidden × intermediate``) and large squares, where a BLAS is at its
    best. The CPU squares stay small enough for the measurement to take about a second."""
    squares = [1024] if device == "cpu" else [4096, 8192]
    return [(tokens, hidden, intermediate)] + [(s, s, s) for s in squares]


def measure_peak_matmul(
    device: str,
    dtype: Any,
    shapes: list[tuple[int, int, int]],
    repeats: int = 5,
    budget_seconds: float = 0.3,
) -> dict[str, Any]:
    """The best ``torch.mm`` rate over ``shapes``, in GFLOP/s, with the current thread count.

    Each ``(m, k, n)`` product is run once to warm up, then timed up to ``repeats`` times (at
    least twice, and no more once ``budget_seconds`` is spent on it); its best time gives its
    rate. CUDA is synchronised around every timing. Returns ``peak_gflops``, ``peak_shape``
    (``[m, k, n]``) and ``gflops_by_shape`` (``"mxkxn"`` → GFLOP/s).
    """
    import torch

    rates: dict[str, float] = {}
    best_rate, best_shape = 0.0, None
    cuda = device == "cuda"
    generator = torch.Generator(device=device).manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
        out = torch.empty(m, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: first-call dispatch, allocator, kernel choice
        best = math.inf
        spent = 0.0
        for i in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            best = min(best, seconds)
            spent += seconds
            if i >= 1 and spent > budget_seconds:
                break
        rate = 2 * m * k * n / best / 1e9
        rates[f"{m}x{k}x{n}"] = round(rate, 2)
        if rate > best_rate:
            best_rate, best_shape = rate, [m, k, n]
        del a, b, out
    return {"peak_gflops": best_rate, "peak_shape": best_shape, "gflops_by_shape": rates}
