"""Typed configs: dataclass fields documented once, read from YAML, the CLI and ``--set``.

A config class is a plain dataclass whose fields are declared with :func:`option`. The help text
given there becomes the ``--help`` of the command, and values are resolved in this order
(later wins): field default < ``--config FILE.yaml`` < ``--field value`` < ``--set field=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "add_config_arguments",
    "add_resume_arguments",
    "config_from_args",
    "load_config",
    "load_yaml",
    "option",
    "to_dict",
]

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with its help text (``choices=[...]`` restricts the value)."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The non-None type inside ``X | None`` and whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Coerce a YAML or command-line value to the field's declared type."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed")
    try:
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [
                _convert(name, item_type, v.strip() if isinstance(v, str) else v)
                for v in items
                if v != ""
            ]
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value}")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError) as err:
        prefix = f"config field {name!r}: "
        message = str(err)  # list items arrive already prefixed
        raise ValueError(message if message.startswith(prefix) else prefix + message) from None
    return value


def _check_choice(name: str, field: dataclasses.Field, value: Any) -> None:
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"config field {name!r} must be one of {list(choices)}, got {value!r}")


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, with_file: bool = True
) -> None:
    """Add ``--config``, ``--set`` and one ``--field-name`` option per field of ``cls``."""
    if with_file:
        parser.add_argument("--config", type=Path, help="YAML file with config values")
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config value (repeatable), e.g. --set beta=0.5",
        )
    types_ = _field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "required"
        base, _ = _base_type(types_[field.name])
        metavar = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(base, "LIST")
        choices = field.metadata.get("choices")
        if choices:
            metavar = "{" + ",".join(map(str, choices)) + "}"
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=f"cfg__{field.name}",
            default=argparse.SUPPRESS,
            metavar=metavar,
            # argparse %-formats help strings, so a literal % must be escaped.
            help=f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%"),
        )


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume DIR`` and ``--allow-config-change``, the same for every training command."""
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue exactly from a checkpoint folder (output_dir/checkpoint) of a run with "
        "the same settings",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's (each changed "
        "field is named in a warning); without it such a resume is refused",
    )


def load_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and coercing types."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; known keys: {sorted(known)}")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(name, types_[name], value)
        _check_choice(name, known[name], kwargs[name])
    missing = [
        n
        for n, f in known.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{source}: missing required config value(s) {missing}")
    return cls(**kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Resolve defaults < YAML file < ``--field`` < ``--set`` into a config instance."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise ValueError(
                f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the "
                "file as UTF-8"
            ) from None
        loaded = load_yaml(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
        values.update(loaded)
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            values[key[5:]] = value
    for item in getattr(args, "overrides", []) or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        name = key.strip().replace("-", "_")
        values[name] = load_yaml(value, f"--set {item}") if value.strip() else value
    return load_config(cls, values, source=str(path) if path else "command line")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a mapping key given twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, int | None]:
    """One line describing a YAML error, and the 1-based line it points at."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context and getattr(err, "problem", None) else problem
    if "'\\t'" in text:
        text += " (YAML indents with spaces; replace the tab)"
    return text, (mark.line + 1 if mark is not None else None)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; errors (syntax, tabs, duplicate keys) name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        problem, line = _yaml_problem(err)
        where = f"{source}, line {line}" if line is not None else source
        raise ValueError(f"{where}: invalid YAML: {problem}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-friendly dict of a config instance."""
    return dataclasses.asdict(config)
