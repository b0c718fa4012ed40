"""A lean ancestral-sampling decoder: the model's forward in a short loop over a static KV cache.

For small models on a CPU, Hugging Face ``generate`` spends about as long around the model as
in its matrix products: ``torch.multinomial`` over the whole vocabulary at every step draws one
random number per vocabulary entry, the dynamic cache concatenates its keys and values at every
step, and logits processors, stopping criteria and input preparation run in Python each step.
:func:`decode` keeps only what ancestral sampling needs:

- one prefill per distinct prompt into a pre-allocated cache, whose rows are then copied to
  every response of that prompt (RLOO and GRPO sample several), and one forward per new token,
  all in inference mode;
- the next-token distribution of :func:`next_token_logits`, which applies the same settings as
  ``generate`` in the same order (allowed tokens, EOS blocked before ``min_new_tokens``,
  temperature, top-k, top-p) with the same definitions;
- :func:`sample_categorical`, inverse-CDF sampling with one uniform number per row. It draws
  token ``v`` with probability ``p(v)`` up to float64 rounding, so the sampled distribution is
  the one ``generate`` samples, though not the same draws for the same seed.

Positions come from the attention mask (:func:`position_ids_from_mask`), as in
:func:`pmrlhf.rl.rollout.token_logprobs`, so the log-probability of a token at scoring time is
the one it was sampled with. A checkpoint's ``generation_config`` is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def next_token_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allowed: Tensor | None = None,
    blocked: Tensor | None = None,
) -> Tensor:
    """The fp32 logits whose softmax is the next-token sampling distribution, ``(B, V)``.

    Settings apply in ``generate``'s order: ``allowed`` (a boolean ``(V,)`` mask) and
    ``blocked`` (token ids, e.g. EOS before ``min_new_tokens``) set logits to ``-inf``; then
    the logits are divided by ``temperature``; ``top_k > 0`` keeps the tokens whose logit is at
    least the k-th largest (ties included); ``top_p < 1`` drops, in ascending order of
    probability, every token whose cumulative probability up to and including it is at most
    ``1 − top_p``, and always keeps the most likely token.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if blocked is not None and blocked.numel():
        logits = logits.index_fill(-1, blocked, float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        mass_so_far = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
        drop = mass_so_far <= 1.0 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``probs`` ``(B, V)``, by inverting the cumulative distribution.

    Row ``b`` returns ``v`` when ``u · Σ p ∈ [cdf(v−1), cdf(v))`` for a uniform ``u``: that
    interval has length ``p(v)``, so zero-probability tokens are never drawn, and only ``B``
    random numbers are needed, where ``torch.multinomial`` draws ``B × V``.
    """
    # in float64, each token's interval is its probability to ~1e-16, whatever the vocabulary
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.clamp_max_(probs.shape[-1] - 1).squeeze(-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Each token's position counted over the real (mask 1) tokens of its row, 0 on padding:
    a left-padded prompt's tokens get the positions they would have without the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _static_cache(model, max_length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_length)


def _select_cache_rows(cache, rows: Tensor) -> None:
    """Make row ``b`` of every layer's keys and values a copy of row ``rows[b]``.

    transformers' static cache layers keep their tensors as ``keys`` and ``values`` (and have no
    row-selection method of their own); the decoder's tests compare against ``generate``, so a
    change there shows.
    """
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
        layer.batch_size = rows.numel()


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that shapes a rollout's sampled distribution besides the model."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    #: decoding ends once every row has produced one of these (none: always ``max_new_tokens``)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    bos_token_id: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    #: several processes decode a model sharded over them (FSDP, ZeRO-3), which gathers weights
    #: in every forward: none may stop while another still decodes (the lean decoder runs
    #: ``max_new_tokens`` steps, ``generate`` gets ``synced_gpus``)
    sharded: bool = False


def decode(
    model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings
) -> tuple[Tensor, Tensor]:
    """Sample up to ``settings.max_new_tokens`` tokens after left-padded prompts ``(B, P)``.

    Returns the response ids ``(B, T)``, ``T ≤ max_new_tokens``, and the log-probability each
    token was drawn with (fp32, ``(B, T)``; 0 after a row's end). Decoding stops once every row
    has produced one of ``eos_token_ids``, and a row's tokens after it are ``pad_token_id``.
    Random numbers come from torch's global generator on the model's device.

    A ``sharded`` model runs every step, under ``no_grad``: inference mode, used otherwise,
    would mark the weights its sharding framework gathers as unusable for training. The steps
    after every row's end are dropped, so the output is the unsharded one.
    """
    # Inference mode skips autograd's per-operation bookkeeping, a visible share of a small
    # model's decoding step; the results are cloned out of it so that training can use them.
    with torch.no_grad() if settings.sharded else torch.inference_mode():
        tokens, logprobs = _decode(model, input_ids, attention_mask, settings)
    return tokens.clone(), logprobs.clone()


def _decode(
    model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings
) -> tuple[Tensor, Tensor]:
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    steps = settings.max_new_tokens
    cache = _static_cache(model, prompt_length + steps)
    positions = position_ids_from_mask(attention_mask)
    logits = _prefill(model, input_ids, attention_mask, positions, cache)
    allowed = None
    if settings.allowed_token_ids is not None:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        allowed[torch.tensor(settings.allowed_token_ids, device=device)] = True
    eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
    # the mask of every position the cache will hold; a row's new positions are always attended
    mask = torch.cat([attention_mask, attention_mask.new_ones((batch, steps))], dim=1)
    position = positions[:, -1:]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    logprobs: list[Tensor] = []
    # sharded runs go on past the last row's end: per step, whether some row was still decoding
    live_steps: list[Tensor] = []
    for step in range(steps):
        if settings.sharded:
            live_steps.append(~finished.all())
        blocked = eos if step < settings.min_new_tokens else None
        next_logits = next_token_logits(
            logits, settings.temperature, settings.top_k, settings.top_p, allowed, blocked
        )
        probs = torch.softmax(next_logits, dim=-1)
        token = sample_categorical(probs)
        logprob = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
        tokens.append(torch.where(finished, settings.pad_token_id, token))
        logprobs.append(logprob.masked_fill(finished, 0.0))
        finished |= torch.isin(tokens[-1], eos)  # never, without EOS tokens
        done = not settings.sharded and bool(finished.all())
        if done or step + 1 == steps:
            break
        position = position + 1
        length = prompt_length + step + 1
        logits = model(
            input_ids=tokens[-1].unsqueeze(-1),
            attention_mask=mask[:, : length + 1],
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([length], device=device),
        ).logits[:, -1]
    # the steps after every row's end are dropped (unsharded runs stopped there already)
    width = int(torch.stack(live_steps).sum()) if settings.sharded else len(tokens)
    return torch.stack(tokens, dim=1)[:, :width], torch.stack(logprobs, dim=1)[:, :width]


def _prefill(model, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache) -> Tensor:
    """Run the prompts into ``cache``; return each row's next-token logits ``(B, V)``.

    Several responses per prompt (RLOO, GRPO) share their prompt's keys and values: the prefill
    runs once per distinct prompt row, and the cache rows are then copied to every row.
    """
    batch, prompt_length = input_ids.shape
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    distinct, row_of = torch.unique(rows, dim=0, return_inverse=True)
    shared = distinct.shape[0] < batch
    pick: Tensor | slice = slice(None)
    if shared:
        first = torch.full((distinct.shape[0],), batch, dtype=torch.long, device=rows.device)
        pick = first.scatter_reduce_(0, row_of, torch.arange(batch, device=rows.device), "amin")
    logits = model(
        input_ids=input_ids[pick],
        attention_mask=attention_mask[pick],
        position_ids=positions[pick],
        past_key_values=cache,
        use_cache=True,
        cache_position=torch.arange(prompt_length, device=rows.device),
        logits_to_keep=1,
    ).logits[:, -1]
    if not shared:
        return logits
    _select_cache_rows(cache, row_of)
    return logits[row_of]
