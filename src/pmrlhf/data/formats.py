"""The four data formats and their normalised records.

Every input layout is turned into one of four small records, checked field by field:

=============  =====================================================================
record         accepted rows (see docs/data-formats.md for examples)
=============  =====================================================================
PromptRecord   ``prompt`` (text or a list of chat messages); or ``messages`` (the
               turns up to the last user turn); or HH-RLHF ``chosen``/``rejected``
               (the prompt is their shared ``\\n\\nHuman: … \\n\\nAssistant:`` prefix)
SFTRecord      ``prompt`` + ``completion``; or chat ``messages`` ending with an
               assistant turn; or ``prompt`` + ``chosen`` (Dahoas); or HH-RLHF
               ``chosen`` alone; or ``prompt`` + ``response``; or the best of ranked
               ``responses``
PairRecord     ``prompt`` + ``chosen`` + ``rejected`` (also Dahoas, which adds an
               unused ``response``); or HH-RLHF ``chosen`` + ``rejected`` only
RankingRecord  ``prompt`` + ``responses`` ranked best to worst; or ``prompt`` +
               ``responses`` + ``scores`` (higher is better); or any pair (K = 2)
=============  =====================================================================

Row parsers raise :class:`DataError` (a ValueError) naming the row's location and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pmrlhf.data.text import HH_ASSISTANT, ChatRenderer

__all__ = [
    "DataError",
    "PairRecord",
    "PromptRecord",
    "RankingRecord",
    "SFTRecord",
    "parse_pair",
    "parse_prompt",
    "parse_ranking",
    "parse_rows",
    "parse_scored",
    "parse_sft",
    "split_hh",
]


class DataError(ValueError):
    """A row of input data is unusable; the message names file, row and field."""


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PromptRecord:
    """A prompt for RL rollouts, as the text the policy continues."""

    prompt: str


@dataclass(frozen=True)
class SFTRecord:
    """A demonstration: the loss is taken on ``completion`` only, which follows ``prompt``."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class RankingRecord:
    """Responses to one prompt, ranked best first (a Plackett–Luce observation)."""

    prompt: str
    responses: tuple[str, ...]

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> Iterator[PairRecord]:
        """Every pairwise comparison the ranking implies (K·(K−1)/2 of them)."""
        for i, better in enumerate(self.responses):
            for worse in self.responses[i + 1 :]:
                yield PairRecord(self.prompt, better, worse)


@dataclass(frozen=True)
class PairRecord:
    """One comparison: ``chosen`` was preferred to ``rejected`` (a ranking with K = 2)."""

    prompt: str
    chosen: str
    rejected: str

    def as_ranking(self) -> RankingRecord:
        return RankingRecord(self.prompt, (self.chosen, self.rejected))


# --------------------------------------------------------------------------- field checks
def _fail(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}, field {field!r}: {problem}")


def _present(row: Mapping[str, Any], field: str) -> bool:
    return row.get(field) is not None


def _text(row: Mapping[str, Any], field: str, where: str, value: Any = None) -> str:
    value = row.get(field) if value is None else value
    if value is None:
        raise _fail(where, field, "missing (no value in this row)")
    if not isinstance(value, str):
        raise _fail(where, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, field, "is empty")
    return value


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A validated chat: a non-empty list of ``{"role": str, "content": non-empty str}``."""
    if not isinstance(value, list) or not value:
        raise _fail(where, field, "must be a non-empty list of chat messages")
    out = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _fail(where, name, f"must be a message object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise _fail(where, name + ".role", "must be a non-empty string")
        content = _text(message, f"{name}.content", where, message.get("content"))
        out.append({"role": role, "content": content})
    return out


def _is_chat(value: Any) -> bool:
    return isinstance(value, list)


def _prompt_value(row: Mapping[str, Any], where: str, renderer: ChatRenderer):
    """The prompt as (rendered text, messages or None)."""
    value = row.get("prompt")
    if _is_chat(value):
        messages = _messages(value, "prompt", where)
        return renderer.prompt(messages), messages
    return _text(row, "prompt", where), None


def _reply(value: Any, field: str, where: str, renderer: ChatRenderer, context: list | None) -> str:
    """A response given as text, one assistant message, or a one-message list."""
    if isinstance(value, Mapping):
        value = [value]
    if _is_chat(value):
        messages = _messages(value, field, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _fail(where, field, "a chat response must be exactly one assistant message")
        content = messages[0]["content"]
        return renderer.completion(context, content) if context is not None else content
    text = _text({field: value}, field, where)
    return renderer.completion(context, text) if context is not None else text


def split_hh(text: str, other: str | None = None) -> tuple[str, str, str | None] | None:
    """Split HH-RLHF text into (prompt, response, other response) at the last ``\\n\\nAssistant:``.

    With two texts the split point is the last ``\\n\\nAssistant:`` inside their common prefix,
    so a shared conversation history stays in the prompt. Returns None if there is none.
    """
    shared = text if other is None else _common_prefix(text, other)
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    return text[:end], text[end:], None if other is None else other[end:]


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


# --------------------------------------------------------------------------- row parsers
def parse_prompt(
    row: Mapping[str, Any], where: str, renderer: ChatRenderer | None = None
) -> PromptRecord:
    """A prompt from ``prompt``, chat ``messages`` or HH-RLHF ``chosen``/``rejected``."""
    renderer = renderer or ChatRenderer()
    if _present(row, "prompt"):
        return PromptRecord(_prompt_value(row, where, renderer)[0])
    if _present(row, "messages"):
        messages = _messages(row["messages"], "messages", where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # an RL prompt stops before the reply to be generated
        if not messages:
            raise _fail(where, "messages", "has no user turn to use as a prompt")
        return PromptRecord(renderer.prompt(messages))
    if _present(row, "chosen") and _present(row, "rejected"):
        return PromptRecord(parse_pair(row, where, renderer).prompt)
    raise _fail(where, "prompt", "missing; prompt data needs a 'prompt' or 'messages' field")


def parse_sft(
    row: Mapping[str, Any], where: str, renderer: ChatRenderer | None = None
) -> SFTRecord:
    """A demonstration from prompt/completion, chat messages, Dahoas or HH-RLHF rows."""
    renderer = renderer or ChatRenderer()
    if _present(row, "messages") and not _present(row, "completion"):
        return _sft_from_chat(row["messages"], "messages", where, renderer)
    for field in ("completion", "chosen", "response"):
        if not _present(row, field):
            continue
        if field == "chosen" and not _present(row, "prompt"):
            if _is_chat(row["chosen"]):  # a conversational pair: learn the chosen chat
                return _sft_from_chat(row["chosen"], "chosen", where, renderer)
            text = _text(row, "chosen", where)
            parts = split_hh(text)
            if parts is None or not parts[1].strip():
                raise _fail(where, "chosen", "no prompt field, and no '\\n\\nAssistant:' turn")
            return SFTRecord(parts[0], parts[1])
        prompt, context = _prompt_value(row, where, renderer)
        return SFTRecord(prompt, _reply(row[field], field, where, renderer, context))
    if _present(row, "responses"):
        # ranked data: demonstrate the best response
        ranking = parse_ranking(row, where, renderer, strict=False)
        if not ranking.responses:
            raise _fail(where, "responses", "is empty; SFT needs at least one response")
        return SFTRecord(ranking.prompt, ranking.responses[0])
    if _present(row, "prompt"):
        raise _fail(where, "completion", "missing; SFT data needs 'prompt' and 'completion'")
    raise _fail(
        where, "prompt", "missing; SFT data needs 'prompt' and 'completion', or chat 'messages'"
    )


def _sft_from_chat(value: Any, field: str, where: str, renderer: ChatRenderer) -> SFTRecord:
    messages = _messages(value, field, where)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise _fail(where, field, "must end with an assistant turn that follows the prompt")
    context = messages[:-1]
    return SFTRecord(
        renderer.prompt(context), renderer.completion(context, messages[-1]["content"])
    )


def parse_pair(
    row: Mapping[str, Any],
    where: str,
    renderer: ChatRenderer | None = None,
    distinct: bool = True,
) -> PairRecord:
    """A comparison from prompt/chosen/rejected, Dahoas or HH-RLHF rows.

    ``distinct`` (training) rejects a pair whose two responses are identical.
    """
    renderer = renderer or ChatRenderer()
    for field in ("chosen", "rejected"):
        if not _present(row, field):
            raise _fail(
                where, field, "missing; pairwise data needs 'prompt', 'chosen' and 'rejected'"
            )
    if _present(row, "prompt"):
        prompt, context = _prompt_value(row, where, renderer)
        chosen = _reply(row["chosen"], "chosen", where, renderer, context)
        rejected = _reply(row["rejected"], "rejected", where, renderer, context)
    elif _is_chat(row["chosen"]) and _is_chat(row["rejected"]):
        prompt, chosen, rejected = _split_chat_pair(row, where, renderer)
    else:
        a, b = _text(row, "chosen", where), _text(row, "rejected", where)
        # identical texts share everything: split them as one conversation
        parts = split_hh(a, b) if a != b else split_hh(a)
        if parts is None:
            raise _fail(
                where,
                "prompt",
                "missing, and 'chosen'/'rejected' share no '\\n\\nAssistant:' turn to split "
                "an HH-RLHF prompt from",
            )
        prompt, chosen = parts[0], parts[1]
        rejected = chosen if parts[2] is None else parts[2]
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise _fail(where, field, "is empty after removing the shared HH-RLHF prompt")
    if distinct and chosen == rejected:
        raise _fail(where, "rejected", "is identical to 'chosen'; a comparison needs two responses")
    return PairRecord(prompt, chosen, rejected)


def _split_chat_pair(row: Mapping[str, Any], where: str, renderer: ChatRenderer):
    # Conversational preference data without a prompt: the shared leading turns are the prompt.
    a = _messages(row["chosen"], "chosen", where)
    b = _messages(row["rejected"], "rejected", where)
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    context = a[:n]
    for field, turns in (("chosen", a), ("rejected", b)):
        if not context or len(turns) != n + 1 or turns[-1]["role"] != "assistant":
            raise _fail(
                where, field, "must be the shared prompt turns plus one final assistant reply"
            )
    return (
        renderer.prompt(context),
        renderer.completion(context, a[-1]["content"]),
        renderer.completion(context, b[-1]["content"]),
    )


def parse_ranking(
    row: Mapping[str, Any],
    where: str,
    renderer: ChatRenderer | None = None,
    strict: bool = True,
) -> RankingRecord:
    """A ranking from ``responses`` (best first), ``responses`` + ``scores``, or any pair row.

    ``strict`` (training) requires at least two distinct responses; scoring relaxes it.
    """
    renderer = renderer or ChatRenderer()
    if not _present(row, "responses"):
        if _present(row, "chosen") or _present(row, "rejected"):
            return parse_pair(row, where, renderer, distinct=strict).as_ranking()
        raise _fail(
            where,
            "responses",
            "missing; listwise data needs 'prompt' and 'responses' (or pairwise 'chosen' and "
            "'rejected')",
        )
    prompt, context = _prompt_value(row, where, renderer)
    raw = row["responses"]
    if not isinstance(raw, list):
        raise _fail(where, "responses", f"must be a list of responses, got {type(raw).__name__}")
    responses = [
        _reply(value, f"responses[{i}]", where, renderer, context) for i, value in enumerate(raw)
    ]
    if _present(row, "scores"):
        responses = _sort_by_scores(responses, row["scores"], where, strict)
    if strict:
        if len(responses) < 2:
            raise _fail(
                where, "responses", f"a ranking needs at least 2 responses, got {len(responses)}"
            )
        seen: dict[str, int] = {}
        for i, response in enumerate(responses):
            if response in seen:
                raise _fail(
                    where,
                    "responses",
                    f"duplicate response (items {seen[response]} and {i} are equal); a ranking "
                    "orders distinct responses",
                )
            seen[response] = i
    return RankingRecord(prompt, tuple(responses))


def _sort_by_scores(responses: list[str], scores: Any, where: str, strict: bool) -> list[str]:
    """Responses sorted by score, highest first; ``strict`` (training) rejects tied scores."""
    if not isinstance(scores, list) or len(scores) != len(responses):
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise _fail(where, "scores", f"must be a list of {len(responses)} numbers, got {got}")
    for i, score in enumerate(scores):
        if (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not math.isfinite(score)
        ):
            raise _fail(where, f"scores[{i}]", f"must be a finite number, got {score!r}")
    if strict:
        # A ranking is a strict order: a tie has no Plackett-Luce meaning, and keeping the
        # listed order would invent a preference the data does not state.
        first: dict[float, int] = {}
        for i, score in enumerate(scores):
            if float(score) in first:
                raise _fail(
                    where,
                    "scores",
                    f"scores[{first[float(score)]}] and scores[{i}] are tied at {score}; a "
                    "ranking needs distinct scores (break or drop ties before training)",
                )
            first[float(score)] = i
    # stable: where ties are allowed (scoring, SFT's best response) the listed order is kept
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    return [responses[i] for i in order]


def parse_scored(
    row: Mapping[str, Any], where: str, renderer: ChatRenderer | None = None
) -> RankingRecord:
    """The responses of any row to score: a ranking, a pair, or an SFT completion (K = 1).

    Order and duplicates are kept as given: scoring needs no ranking.
    """
    renderer = renderer or ChatRenderer()
    if any(_present(row, f) for f in ("responses", "chosen", "rejected")):
        return parse_ranking(row, where, renderer, strict=False)
    record = parse_sft(row, where, renderer)
    return RankingRecord(record.prompt, (record.completion,))


def parse_rows(
    rows: Sequence[Mapping[str, Any]], where: Sequence[str], kind: str, renderer: ChatRenderer
) -> list[Any]:
    """Parse rows of one format (``prompt``, ``sft``, ``pair``, ``ranking``, ``score``)."""
    parser = {
        "prompt": parse_prompt,
        "sft": parse_sft,
        "pair": parse_pair,
        "ranking": parse_ranking,
        "score": parse_scored,
    }[kind]
    return [parser(row, loc, renderer) for row, loc in zip(rows, where)]
