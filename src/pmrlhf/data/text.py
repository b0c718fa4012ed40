"""Turning chat messages into text, and text into token ids, the same way everywhere.

Conversational data (lists of ``{"role", "content"}`` messages) is rendered with the tokenizer's
chat template when it has one. Without a template (or without a tokenizer) it is rendered in the
Anthropic HH-RLHF layout, ``"\\n\\nHuman: …\\n\\nAssistant:"``, so chat data and HH-style text
data end up in one format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "HH_ASSISTANT",
    "HH_HUMAN",
    "ChatRenderer",
    "encode_texts",
    "pad_right",
    "special_prefix_ids",
]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}

Message = dict[str, str]


class ChatRenderer:
    """Renders message lists into a prompt string and a completion string.

    ``prompt(messages)`` ends where the assistant's reply starts (the template's generation
    prompt, or ``"\\n\\nAssistant:"``); ``completion(messages, reply)`` is exactly the text that
    follows it, so ``prompt + completion`` is the rendered conversation.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt(self, messages: Sequence[Message]) -> str:
        if self.uses_template:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        turns = "".join(f"\n\n{_hh_role(m['role'])}: {m['content']}" for m in messages)
        return turns + HH_ASSISTANT

    def completion(self, messages: Sequence[Message], reply: str) -> str:
        if self.uses_template:
            head = self.prompt(messages)
            full = self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": reply}], tokenize=False
            )
            if full.startswith(head):
                # Trailing whitespace after the end-of-turn marker is dropped so the completion
                # ends on the marker, which is then the last token the model learns to emit.
                return full[len(head) :].rstrip()
            return reply
        return " " + reply


def _hh_role(role: str) -> str:
    return _HH_ROLES.get(role.lower(), role.capitalize())


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before text (e.g. Llama's BOS; none for GPT-2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    cut = len(with_special) - len(plain)
    if cut > 0 and with_special[cut:] == plain:
        return list(with_special[:cut])
    return []


def encode_texts(
    tokenizer: Any, texts: Sequence[str], add_special_prefix: bool = True
) -> list[list[int]]:
    """Token ids of each text, in one batched tokenizer call.

    The tokenizer's leading special tokens (BOS) are added once: text that already starts with
    the BOS string, as chat-template output often does, does not get a second one.
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not add_special_prefix:
        return [list(x) for x in ids]
    prefix = special_prefix_ids(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    return [
        list(x) if not prefix or (bos and text.startswith(bos)) else prefix + list(x)
        for text, x in zip(texts, ids)
    ]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, fill: int | None = None):
    """Right-pad id lists into ``(ids, attention_mask)`` long tensors; ``fill`` overrides pad."""
    import torch

    width = max(len(s) for s in sequences)
    value = pad_id if fill is None else fill
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
