"""Rollout: sample responses, then score token log-probabilities with one forward pass.

Sequences are laid out as ``[left-padded prompt | right-padded response]``. Position ids are
derived from the attention mask in both generation and scoring, so a token's log-probability at
scoring time is the one it was sampled with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from pmrlhf.rl.decoding import pad_to_bucket
from pmrlhf.rl.sampling import SamplingSettings, decode, position_ids_from_mask


@dataclass
class Rollout:
    """A batch of sampled responses. ``sequences`` = prompt ids followed by response ids."""

    sequences: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    response_mask: Tensor  # (B, T): response tokens up to and including the first EOS
    prompt_length: int  # P
    prompts: list[str]
    responses: list[str]

    @property
    def response_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_length :]


@dataclass(frozen=True)
class DistinctRows:
    """The distinct sequences of a batch, for scoring each of them once.

    A policy that repeats itself samples the same (prompt, response) many times; the rows of a
    repeated sequence have the same log-probs, values and rewards, so a forward over
    ``index`` followed by ``take`` gives every row its own result. Taking rows is a gather, so
    the gradient through it is the sum over the repeats: the same gradient as scoring each row.
    """

    index: Tensor  # (U,) the first row of each distinct sequence, in order of first appearance
    inverse: Tensor  # (B,) each row's position in ``index``

    @property
    def count(self) -> int:
        return int(self.index.shape[0])

    def take(self, values: Tensor) -> Tensor:
        """Per-row values ``(B, …)`` from the distinct rows' ``(U, …)``."""
        return values[self.inverse]


def distinct_rows(sequences: Tensor, attention_mask: Tensor) -> DistinctRows:
    """The distinct rows of ``[sequences | attention_mask]`` (the mask tells padding apart from
    a real token with the pad id)."""
    rows = torch.cat([sequences, attention_mask.to(sequences.dtype)], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    n = rows.shape[0]
    positions = torch.arange(n, device=rows.device)
    # the first row of each group, then the groups ordered by it
    first = torch.full((int(inverse.max()) + 1,), n, device=rows.device, dtype=positions.dtype)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=rows.device)
    return DistinctRows(index=first[order], inverse=rank[inverse])


def response_mask_from_ids(response_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """1 for tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response_ids == eos
    # number of EOS strictly before each position
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (eos_before == 0).long()


def _eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if i is not None]


def sampling_config(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    pad_token_id: int | None = None,
    eos_token_id: list[int] | None = None,
    bos_token_id: int | None = None,
    cache_implementation: str | None = None,
):
    """The complete ``GenerationConfig`` of a rollout: ancestral sampling and nothing else.

    Every setting that can change the sampled distribution is given its neutral value here, so
    that nothing is left for transformers to fill in from a checkpoint's
    ``generation_config.json``.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=max_new_tokens,
        # left unset when 0: transformers warns when both minimum-length settings are given
        min_new_tokens=min_new_tokens or None,
        min_length=0,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        length_penalty=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        use_cache=True,
        cache_implementation=cache_implementation or None,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )


@contextmanager
def _without_checkpoint_generation_defaults(model) -> Iterator[None]:
    """Hide the checkpoint's generation config from ``model.generate`` while it runs.

    ``generate`` fills every field its ``generation_config`` argument leaves at ``None`` from
    ``model.generation_config``. Fields whose neutral value *is* ``None`` (``min_p``,
    ``suppress_tokens``, ``bad_words_ids``, ``sequence_bias``, ``forced_eos_token_id``,
    watermarking, …) cannot be switched off through the argument, so the model's own config is
    replaced by a blank one for the duration of the call. This covers a peft wrapper too: the
    swap is done on every sub-module that owns a generation config.
    """
    from transformers import GenerationConfig

    owners = [
        m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)
    ]
    saved = [vars(m)["generation_config"] for m in owners]
    for owner in owners:
        owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for owner, config in zip(owners, saved, strict=True):
            owner.generation_config = config


def _decode_with_hf_generate(
    model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings,
    cache_implementation: str | None,
) -> Tensor:  # fmt: skip
    """Response ids ``(B, T)`` from Hugging Face ``generate``, blind to the checkpoint's
    ``generation_config``; a static cache pads the prompts to a bucketed length first."""
    config = sampling_config(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        pad_token_id=settings.pad_token_id,
        eos_token_id=list(settings.eos_token_ids) or None,
        bos_token_id=settings.bos_token_id,
        cache_implementation=cache_implementation,
    )
    extra: dict = {}
    if settings.sharded:
        extra["synced_gpus"] = True  # every process runs until all of them are done
    if settings.allowed_token_ids is not None:
        extra["logits_processor"] = [_AllowedTokens(list(settings.allowed_token_ids))]
    if cache_implementation == "static":
        # left-pad to a bucketed length: a compiled static-cache decoder then sees a bounded
        # number of prompt shapes instead of one per new prompt length
        input_ids, attention_mask, _ = pad_to_bucket(
            input_ids, attention_mask, settings.pad_token_id
        )
    with _without_checkpoint_generation_defaults(model):
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra
        )
    return sequences[:, input_ids.shape[1] :]


def _decode_lean(
    model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings,
    cache_implementation: str | None,
) -> Tensor:  # fmt: skip
    """Response ids ``(B, T)`` from :func:`pmrlhf.rl.sampling.decode` (its own static cache)."""
    return decode(model, input_ids, attention_mask, settings)[0]


#: Decoders a rollout can sample with. Both sample the same distribution (tested): ``hf`` is
#: Hugging Face ``generate`` (with ``cache_implementation="static"``, compiled decoding on a
#: GPU); ``lean`` is pmrlhf's own loop, faster for small models on a CPU.
DECODERS = {"hf": _decode_with_hf_generate, "lean": _decode_lean}
#: what a ``decoder`` option accepts: a decoder, or ``auto`` (:func:`resolve_decoder`)
DECODER_CHOICES = ("auto", *DECODERS)


def resolve_decoder(name: str, device: torch.device) -> str:
    """The decoder :func:`generate` uses for ``name`` on ``device``: ``auto`` is ``lean`` on a
    CPU, where it saves the sampling and Python overhead that dominates small models' decoding,
    and ``hf`` elsewhere, where HF's compiled static-cache decoding is faster than any eager
    loop."""
    if name == "auto":
        return "lean" if device.type == "cpu" else "hf"
    if name not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {list(DECODER_CHOICES)}, got {name!r}")
    return name


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    stop_at_eos: bool = True,
    cache_implementation: str | None = None,
    allowed_token_ids: list[int] | None = None,
    decoder: str = "auto",
    sharded: bool = False,
) -> Rollout:
    """Sample one response per prompt: plain ancestral sampling by default.

    Only the settings given here shape the sampled distribution; whatever the checkpoint's
    ``generation_config.json`` says about repetition penalties, ``min_p``, suppressed tokens
    and the like is ignored (see :func:`sampling_config`). ``allowed_token_ids`` restricts
    sampling to a fixed token set; pass the same list to :func:`token_logprobs` so that scoring
    uses the same renormalised distribution. ``decoder`` picks the sampling loop from
    :data:`DECODERS` (``auto``: :func:`resolve_decoder`); ``cache_implementation`` applies to
    ``hf`` only. ``sharded`` is for processes that decode a model sharded over them together
    (see :class:`SamplingSettings`).
    """
    device = next(model.parameters()).device
    decoder = resolve_decoder(decoder, device)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(
        device
    )
    eos_ids = _eos_ids(tokenizer, model)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_new_tokens=min_new_tokens,
        eos_token_ids=tuple(eos_ids) if stop_at_eos else (),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        allowed_token_ids=None if allowed_token_ids is None else tuple(allowed_token_ids),
        sharded=sharded,
    )
    response_ids = DECODERS[decoder](
        model, encoded.input_ids, encoded.attention_mask, settings, cache_implementation
    )
    prompt_length = encoded.input_ids.shape[1]
    response_mask = (
        response_mask_from_ids(response_ids, eos_ids)
        if stop_at_eos
        else torch.ones_like(response_ids)
    )
    # tokens after EOS are padding: make them the pad id so they never leak into text
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    sequences = torch.cat([encoded.input_ids, response_ids], dim=1)
    attention_mask = torch.cat([encoded.attention_mask, response_mask], dim=1)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        sequences, attention_mask, response_mask, prompt_length, list(prompts), responses
    )


class _AllowedTokens:
    """Logits processor that keeps only a fixed token set."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = torch.tensor(token_ids)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return restrict_logits(scores, self.token_ids.to(scores.device))


def restrict_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[allowed] = True
    return logits.masked_fill(~keep, float("-inf"))


def response_logits(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    allowed_token_ids: list[int] | None = None,
    upcast: bool = True,
) -> Tensor:
    """The logits that predict the response tokens, (B, T, V): one forward of ``model``.

    Only these ``B × T × V`` logits are materialised, not ``B × (P+T) × V``. ``upcast`` makes
    them fp32; otherwise they stay in the model's dtype. With ``allowed_token_ids`` the other
    tokens get ``-inf``.
    """
    outputs = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=sequences.shape[1] - prompt_length + 1,
    )
    logits = outputs.logits[:, :-1]
    if upcast:
        logits = logits.float()
    if allowed_token_ids is not None:
        logits = restrict_logits(logits, torch.tensor(allowed_token_ids, device=logits.device))
    return logits


def logprobs_from_logits(
    logits: Tensor,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Full-softmax log-probs (and entropies) of the response tokens from :func:`response_logits`.

    Computed in fp32 whatever the logits' dtype. Padding positions hold 0 (see
    :func:`token_logprobs`).
    """
    logits = logits.float()
    targets = sequences[:, prompt_length:]
    valid = attention_mask[:, prompt_length:].bool()
    # one fused pass forward and backward; logsumexp then subtracting takes several
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(log_probs, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, picked, 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.where(valid, _entropy(log_probs), 0.0)
    return logp, entropy


def token_logprobs(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    with_entropy: bool = False,
    allowed_token_ids: list[int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the response tokens under ``model`` (full softmax), shape (B, T).

    Only the logits that predict response tokens are materialised in fp32, which keeps memory at
    ``B × T × V`` rather than ``B × (P+T) × V``. Returns ``(logp, entropy or None)``.

    Padding positions (attention mask 0 after a response's EOS) hold log-prob 0 and entropy 0,
    never ``-inf``: with ``allowed_token_ids`` the pad token is outside the allowed set, and an
    infinite value there would turn into NaN in any later ``exp(a - b) * mask``.
    """
    logits = response_logits(model, sequences, attention_mask, prompt_length, allowed_token_ids)
    return logprobs_from_logits(logits, sequences, attention_mask, prompt_length, with_entropy)


def _entropy(log_probs: Tensor) -> Tensor:
    """``H = −Σ p·log p`` from log-probabilities over the last dimension.

    Tokens outside an allowed set have ``log p = −inf`` and ``p = 0``: their log-probability is
    made finite first, so that they contribute ``0`` rather than ``0·(−inf) = NaN``.
    """
    finite = log_probs.clamp_min(torch.finfo(log_probs.dtype).min)
    return -torch.linalg.vecdot(log_probs.exp(), finite)


class ValueModel(torch.nn.Module):
    """Per-token values from a sequence-classification model's backbone and scalar head.

    Wrapping the reward-model architecture lets the critic start from the reward model (as in
    the paper) and save back as one. The value at response position t is read from the hidden
    state that sees ``s_t = (x, y_<t)``, the position just before token ``y_t``.

    The critic is trained, so its weights are made trainable here however the model was
    loaded: a full model entirely; a LoRA (peft) model its adapter and the scalar head, with
    the base weights left frozen. The backbone is reached through a peft wrapper, whose own
    forward returns classification outputs without hidden states.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = _value_head(model)
        _make_critic_trainable(model, self.head)

    def forward(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        hidden = _backbone(self.model)(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()


def _backbone(model) -> torch.nn.Module:
    """The transformer body (``LlamaModel`` …) of a plain or peft-wrapped classification model."""
    from pmrlhf.lora import unwrap_peft

    return unwrap_peft(model).base_model


def _make_critic_trainable(model, head: torch.nn.Module) -> None:
    from pmrlhf.lora import is_peft_model

    if is_peft_model(model):
        model.set_requires_grad(model.active_adapters, requires_grad=True)
        if not hasattr(head, "modules_to_save"):
            # a head peft does not manage (a causal-LM adapter on a fresh classification head)
            head.requires_grad_(True)
    else:
        model.requires_grad_(True)


def _value_head(model):
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no scalar head named score/classifier/v_head")
