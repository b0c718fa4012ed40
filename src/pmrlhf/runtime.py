"""Run-time plumbing shared by the training commands: seeds, dtypes, JSONL metrics, crash-safe
checkpoint folders, output-folder guards, RNG state capture and worker processes that end with
the process that started them."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not POSIX: output folders are guarded but not locked
    _fcntl = None  # type: ignore[assignment]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ stopping and resuming


class NonFiniteError(ValueError):
    """Training met a non-finite reward, loss, gradient, weight or evaluation metric."""


class ResumeSettingsWarning(UserWarning):
    """A run resumed under settings that differ from its checkpoint's, on explicit request."""


def check_resume_settings(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    ignore: frozenset[str] | set[str],
    where: str,
    allow_changes: bool = False,
) -> list[str]:
    """Compare a checkpoint's settings with the resuming run's; return the changed ones.

    An exact resume under other settings does not exist, so a change of any setting outside
    ``ignore`` is refused with an error that names each field, unless ``allow_changes`` (the
    commands' ``--allow-config-change``) turns it into a loud warning for a deliberate change.
    """
    changed = [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in current.items()
        if name not in ignore and name in saved and saved[name] != value
    ]
    if not changed:
        return []
    detail = "; ".join(changed)
    if not allow_changes:
        raise ValueError(
            f"{where}: the checkpoint was trained with other settings ({detail}); an exact "
            "resume needs the same ones (pass --allow-config-change to change them on purpose)"
        )
    import warnings

    warnings.warn(
        f"{where}: resuming with changed settings ({detail}); the run is no longer the "
        "continuation of the one that wrote the checkpoint",
        ResumeSettingsWarning,
        stacklevel=2,
    )
    return changed


def run_length_settings(lr_schedule: str) -> frozenset[str]:
    """Run-length settings a resume may change: under a constant schedule the length of a run
    does not move its steps, so a finished run can be continued for more of them."""
    return frozenset({"max_steps", "epochs"}) if lr_schedule == "constant" else frozenset()


def check_finite_weights(accelerator: Any, model: Any, what: str) -> None:
    """Raise :class:`NonFiniteError` unless every weight of ``model`` is finite (all processes)."""
    params = list(model.named_parameters())
    # a sharded parameter (FSDP2's DTensor) is checked on its local shard; the reduce below
    # then covers every process
    finite = [torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all() for _, p in params]
    bad = 0.0 if not finite or bool(torch.stack(finite).all()) else 1.0
    if float(accelerator.reduce(torch.tensor(bad, device=accelerator.device), reduction="sum")):
        names = [name for (name, _), ok in zip(params, finite, strict=True) if not bool(ok)]
        where = f" ({names[0]})" if names else " (on another process)"
        raise NonFiniteError(f"refusing to save {what}: its weights are not finite{where}")


# ------------------------------------------------------------------ crash-safe folder commits
#
# A folder (a checkpoint, a saved model) is written into ``<final>.tmp``, flushed to disk, marked
# complete, and then swapped in by renames: ``final -> final.old``, ``tmp -> final``, drop
# ``.old``. At every instant at least one complete copy exists on disk: ``final``, or a complete
# ``.tmp``, or ``.old``; :func:`recover_directory` turns whichever it is back into ``final``.

COMPLETE_MARKER = ".complete"


def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then every folder, deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                _fsync_file(path)
        _fsync_dir(Path(folder))


def _remove_tree(path: Path) -> None:
    """Delete a folder, its completeness marker first, so a half-deleted copy never looks whole."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path)


def recover_directory(final: str | os.PathLike) -> Path | None:
    """Bring ``final`` back after a crash during :func:`commit_directory`; call it before loading.

    - ``final`` exists: it is complete; leftover ``.tmp``/``.old`` folders are removed.
    - otherwise a complete ``.tmp`` (the newer copy) becomes ``final``;
    - otherwise ``.old`` (the previous copy) becomes ``final``;
    - otherwise there is nothing to recover: an unfinished ``.tmp`` is removed.

    Returns ``final``, or ``None`` when no complete copy exists.
    """
    final = Path(final)
    tmp, old = _sibling(final, ".tmp"), _sibling(final, ".old")
    if final.is_dir():
        restored = True
    elif tmp.is_dir() and (tmp / COMPLETE_MARKER).is_file():
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        restored = True
    elif old.is_dir():
        os.rename(old, final)
        _fsync_dir(final.parent)
        restored = True
    else:
        restored = False
    for leftover in (tmp, old):
        if leftover.exists():
            _remove_tree(leftover)
    if not restored:
        return None
    (final / COMPLETE_MARKER).unlink(missing_ok=True)
    return final


def has_complete_copy(final: str | os.PathLike) -> bool:
    """Whether ``final`` exists or :func:`recover_directory` would restore it (changes nothing).

    For argument checks that run before recovery, e.g. ``--resume output_dir/checkpoint``.
    """
    final = Path(final)
    tmp = _sibling(final, ".tmp")
    return final.is_dir() or (tmp / COMPLETE_MARKER).is_file() or _sibling(final, ".old").is_dir()


def fresh_temp_directory(final: str | os.PathLike) -> Path:
    """An empty ``<final>.tmp`` sibling folder to write a checkpoint into.

    Recovers ``final`` first, so that a complete copy left by an earlier crash is never the one
    deleted to make room.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tmp = _sibling(final, ".tmp")
    if tmp.exists():
        _remove_tree(tmp)
    tmp.mkdir()
    return tmp


def commit_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace ``final`` by the fully written folder ``tmp``, crash-safely.

    ``tmp`` is flushed to disk and marked complete before anything is renamed, and each rename
    is flushed; a crash at any point leaves a state :func:`recover_directory` completes.
    """
    tmp, final = Path(tmp), Path(final)
    old = _sibling(final, ".old")
    _fsync_tree(tmp)
    marker = tmp / COMPLETE_MARKER
    with marker.open("w") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        if old.exists():
            _remove_tree(old)
        os.rename(final, old)
        _fsync_dir(final.parent)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        _remove_tree(old)
    (final / COMPLETE_MARKER).unlink(missing_ok=True)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` (write, then rename)."""
    tmp = fresh_temp_directory(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, final)


# ------------------------------------------------------------------ output folders


class OutputDirError(ValueError):
    """An output folder that cannot be used as asked (a file, a used folder, a folder in use)."""


LOCK_FILE = ".lock"
# What a finished or running pmrlhf command leaves in its output folder.
RUN_ARTEFACTS = ("checkpoint*", "metrics.jsonl", "model", "policy", "eval.json", "tensorboard")
_USED_MARKERS = ("checkpoint*", "metrics.jsonl", "model", "policy")


def _matches(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    found: dict[Path, None] = {}
    for pattern in patterns:
        for item in sorted(path.glob(pattern)):
            found.setdefault(item, None)
    return list(found)


class OutputDirClaim:
    """An output folder held by this process: an exclusive lock on ``<output_dir>/.lock``.

    Use it as a context manager, or call :meth:`release` when the run ends; the lock also goes
    when the process dies, so a killed run never leaves its folder locked.
    """

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _fcntl is not None:
                _fcntl.flock(self._fd, _fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDirClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(path: Path, command: str) -> int | None:
    if _fcntl is None:  # pragma: no cover
        return None
    lock_path = path / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            holder = lock_path.read_text().strip()
        except OSError:
            holder = ""
        raise OutputDirError(
            f"output_dir {path} is in use by another run"
            + (f" ({holder})" if holder else "")
            + "; wait for it to finish or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
    return fd


def claim_output_dir(
    path: str | os.PathLike, *, overwrite: bool, resume: bool, command: str
) -> OutputDirClaim:
    """Check and lock a run's output folder before anything is written into it.

    - an existing *file* at ``path`` is refused;
    - a folder that already holds a run (``metrics.jsonl``, ``checkpoint*``, ``model``,
      ``policy``) is refused unless ``resume`` (continue it) or ``overwrite`` (replace it: the
      previous run's checkpoints, metrics, models, ``eval.json`` and TensorBoard logs are
      deleted, other files are left alone);
    - the folder is locked for this process; a second run into it gets a clear error that names
      the folder and the command holding it.

    ``command`` (e.g. ``"pmrlhf rl"``) is recorded in the lock file for that message. Call it on
    the main process only.
    """
    path = Path(path)
    if overwrite and resume:
        raise OutputDirError("--overwrite and --resume contradict each other; give one of them")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"output_dir {path} cannot be created: {err.strerror}") from None
    claim = OutputDirClaim(path, _lock(path, command))
    try:
        used = _matches(path, _USED_MARKERS)
        if used and not (overwrite or resume):
            names = ", ".join(item.name for item in used)
            raise OutputDirError(
                f"output_dir {path} already holds a run ({names}); pass --resume to continue "
                "it or --overwrite to replace it"
            )
        if overwrite:
            for item in _matches(path, RUN_ARTEFACTS):
                if item.is_dir() and not item.is_symlink():
                    _remove_tree(item)
                else:
                    item.unlink()
            _fsync_dir(path)
    except BaseException:
        claim.release()
        raise
    return claim


def claim_output_dir_on_main(
    accelerator: Any, path: str | os.PathLike, *, overwrite: bool, resume: bool, command: str
) -> OutputDirClaim | None:
    """:func:`claim_output_dir` on the main process, with its refusal raised on every process.

    Returns the claim on the main process (release it when the run ends) and None elsewhere.
    """
    claim = None
    refusal: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            claim = claim_output_dir(path, overwrite=overwrite, resume=resume, command=command)
        except OutputDirError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise OutputDirError(refusal[0])
    return claim


# ------------------------------------------------------------------ metrics


class JsonlLogger:
    """Appends one JSON object per line and flushes it, so a crash loses at most one line.

    Non-finite numbers are written as ``null`` (the file stays valid JSON). With ``resume_step``
    the existing file is kept up to that step: records of later steps, logged after the
    checkpoint the run resumes from, are dropped so that no step appears twice, and so is a line
    cut short by a crash.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        append: bool = False,
        resume_step: int | None = None,
    ):
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            mode = "a" if (append or resume_step is not None) else "w"
            self._file = self.path.open(mode)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(_plain(record), allow_nan=False, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Keep the records of ``path`` up to ``last_step`` (and those without a step); drop the rest.

    Lines that do not parse (a line cut short by a crash) are dropped too. The file is replaced
    atomically. Returns the number of records dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and step > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = _sibling(path, ".tmp")
        with tmp.open("w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return dropped


def _plain(value: Any) -> Any:
    """``value`` with tensors and numpy scalars made Python, and NaN/±inf made ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist())
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, UTF-8, non-ASCII text kept as it is; returns the path."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# --------------------------------------------------------------------------- worker processes
def exit_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """End this process soon after the process that started it (``parent_pid``) is gone.

    A worker started with ``multiprocessing`` outlives a parent that is killed outright (SIGKILL
    leaves the parent no chance to stop it): it would go on training for hours, writing into the
    run's folders and holding their locks. A daemon thread polls the parent's pid instead (on
    every platform; ``prctl(PR_SET_PDEATHSIG)`` is Linux-only) and ends the process with exit
    code 1 once the worker has been handed to another parent."""

    def orphaned() -> bool:
        return os.getppid() != parent_pid

    def watch() -> None:
        while not orphaned():
            time.sleep(interval)
        print(f"the process that started this one (pid {parent_pid}) has ended; stopping",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)

    if orphaned():  # the parent ended before this process got here
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def stop_workers_on_exit(processes: Sequence[Any], grace: float = 10.0) -> Iterator[None]:
    """Terminate ``processes`` (``multiprocessing.Process``) if the block ends early.

    Inside the block SIGTERM raises ``SystemExit`` in this (main-thread) process, so that a
    ``kill`` or a job scheduler's stop reaches the ``finally`` below as Ctrl-C does; every worker
    still alive is then sent SIGTERM, and joined for up to ``grace`` seconds each. A block that
    ends normally has seen its workers end, and this does nothing."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            if process.pid is not None:  # started
                process.join(grace)
