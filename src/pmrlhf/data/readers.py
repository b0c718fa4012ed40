"""Reading raw rows from local files or the Hugging Face Hub, through ``datasets``.

Local ``.jsonl``, ``.json``, ``.parquet`` and ``.csv`` files load with the matching ``datasets``
builder; anything else that is not an existing path is taken as a hub dataset name. JSON and CSV
files are first read here (UTF-8, with or without a byte-order mark), so a malformed line, a
byte that is not UTF-8 or a CSV row with the wrong number of fields fails with its file and line
number instead of an Arrow or pandas error with neither. The rows read here are also the ones
that get validated, exactly as the file has them: no type guessing (CSV cells stay text, and a
column that mixes numbers and strings is not coerced to one of them).

Every table remembers where its rows came from, so later validation errors can say
"``data.jsonl, line 7``" (jsonl: the 1-based line of the file) or "``data.csv, row 3``".
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: ``datasets`` takes a while to import
    import datasets

__all__ = ["LOCAL_FORMATS", "Table", "load_records", "read_table"]

# file suffix -> ``datasets`` builder name
LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass
class Table:
    """Raw rows plus where each came from.

    ``lines`` holds, for JSON Lines files read whole, the 1-based file line of each row (blank
    lines are skipped, so row ``i`` is not always line ``i + 1``). ``rows`` holds, for local JSON
    and CSV files read whole, each row exactly as the file has it (what validation reads);
    otherwise rows come from ``dataset``.
    """

    dataset: datasets.Dataset
    source: str
    unit: str = "row"
    lines: list[int] | None = None
    rows: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def row_values(self, indices: list[int] | None = None) -> list[dict[str, Any]]:
        """The rows at ``indices`` (default: all), as plain dicts."""
        if self.rows is not None:
            return self.rows if indices is None else [self.rows[i] for i in indices]
        data = self.dataset if indices is None else self.dataset.select(indices)
        return list(data)

    def where(self, index: int) -> str:
        """A human-readable location of row ``index`` (0-based), e.g. ``data.jsonl, line 7``."""
        if self.lines is not None:
            return f"{self.source}, line {self.lines[index]}"
        return f"{self.source}, {self.unit} {index + 1}"


def load_records(source: str | os.PathLike, split: str | None = None) -> datasets.Dataset:
    """Rows of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or of a hub dataset.

    ``split`` picks a hub split (default ``train``) and may slice it (``train[:1000]``); a local
    file is a single ``train`` split. Malformed JSON raises ValueError naming file and line.
    """
    return read_table(source, split).dataset


def read_table(source: str | os.PathLike, split: str | None = None) -> Table:
    """Like :func:`load_records`, keeping the row locations used in error messages."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_directory(path, split)
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {text}")
        return _read_file(path, LOCAL_FORMATS[suffix], split)
    if path.exists():
        raise ValueError(
            f"{text}: unsupported data file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(LOCAL_FORMATS)} or a Hugging Face dataset name"
        )
    if _looks_local(text):
        # a local path that does not exist is never looked up on the Hub
        raise FileNotFoundError(f"data file or folder not found: {text}")
    return _read_hub(text, split)


def _looks_local(text: str) -> bool:
    """A name that can only be a path: ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``, ``a\\b``.

    Hub datasets are ``name`` or ``owner/name``, the same rule as for models
    (:func:`pmrlhf.models.resolve_model_location`).
    """
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
    )


# --------------------------------------------------------------------------- local files
def _read_file(path: Path, builder: str, split: str | None) -> Table:
    lines: list[int] | None = None
    rows: list[dict[str, Any]] | None = None
    unit = "row"
    if builder == "json":
        rows, lines = _read_json_file(path)
        unit = "record" if lines is None else "row"  # a JSON array holds records
    elif builder == "csv":
        rows = _read_csv_file(path)
    dataset = _load(builder, data_files=str(path), split=split or "train", what=str(path))
    if split not in (None, "train") or (rows is not None and len(rows) != len(dataset)):
        # a sliced split ("train[10:20]") no longer lines up with the file's rows
        lines, rows = None, None
    return Table(dataset, str(path), unit=unit, lines=lines, rows=rows)


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped); errors name the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None


def _read_json_file(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a JSON or JSON Lines file, and the line of each row (None for a JSON array)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _read_json_array(path, text), None
    rows: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno}); "
                "each line of a JSON Lines file must be one JSON object"
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"{path}, line {number}: expected a JSON object, got {type(value).__name__}"
            )
        rows.append(value)
        line_numbers.append(number)
    if not line_numbers:
        raise ValueError(f"{path}: the file has no rows")
    return rows, line_numbers


def _read_json_array(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise ValueError(
                f"{path}, record {number}: expected a JSON object, got {type(item).__name__}"
            )
    if not value:
        raise ValueError(f"{path}: the file has no rows")
    return value


def _read_csv_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line, every cell as text; errors name the line."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    try:
        for cells in reader:
            if not cells:
                continue  # a blank line
            if header is None:
                header = [name.strip() for name in cells]
                seen: set[str] = set()
                for name in header:
                    if not name:
                        raise ValueError(
                            f"{path}, line {reader.line_num}: the header has an empty column name"
                        )
                    if name in seen:
                        raise ValueError(
                            f"{path}, line {reader.line_num}: column {name!r} appears twice in "
                            "the header"
                        )
                    seen.add(name)
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected {len(header)} fields "
                    f"({', '.join(header)}), got {len(cells)}"
                )
            rows.append(dict(zip(header, cells)))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
    if not rows:
        raise ValueError(f"{path}: the file has no rows (a header line, then one line per row)")
    return rows


def _read_directory(path: Path, split: str | None) -> Table:
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            name = split or "train"
            if name not in loaded:
                raise ValueError(f"{path}: no split {name!r}; it has {sorted(loaded)}")
            loaded = loaded[name]
        return Table(loaded, str(path))
    return Table(_load(str(path), split=split or "train", what=str(path)), str(path))


# --------------------------------------------------------------------------- hub
def _read_hub(name: str, split: str | None) -> Table:
    chosen = split or "train"
    try:
        dataset = _load(name, split=chosen, what=name, wrap=False)
    except Exception as err:
        raise ValueError(
            f"{name!r} is not a local file or folder, and loading it as a Hugging Face dataset "
            f"(split {chosen!r}) failed: {type(err).__name__}: {err}"
        ) from None
    return Table(dataset, f"{name} (split {chosen})")


# --------------------------------------------------------------------------- datasets glue
@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    # "Generating train split" bars for a local file are noise next to our own progress bar.
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load(path: str, *, split: str, what: str, wrap: bool = True, **kwargs: Any):
    import datasets

    with _quiet_datasets():
        try:
            dataset = datasets.load_dataset(path, split=split, **kwargs)
        except Exception as err:
            if not wrap:
                raise
            raise ValueError(f"{what}: could not be read: {type(err).__name__}: {err}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{what}: expected one split of rows, got {type(dataset).__name__}")
    return dataset
