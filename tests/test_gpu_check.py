"""benchmarks/gpu_check.sh --dry-run on a CPU: every stage's files, commands and options exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["a env", "b wheels", "c tests", "d bench", "e demo"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path / "out"),
        GPU_CHECK_WORK=str(tmp_path / "work"),
        PYTHONPATH=str(ROOT / "src"),
        OMP_NUM_THREADS="1",
        **env,
    )
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )


def summary_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 4 and cells[0] in STAGES:
            rows[cells[0]] = cells[1:]
    return rows


def test_dry_run_checks_every_stage(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = summary_rows(result.stdout)
    assert list(rows) == STAGES, result.stdout
    for stage, (status, seconds, _notes) in rows.items():
        assert status in ("ok", "warn"), (stage, result.stdout)
        assert int(seconds) >= 0
    # the commands the real run would use, with the options they really take
    assert "pytest -m cuda tests/test_cuda.py" in result.stdout
    assert "bench_rloo.py --device cuda --preset gpu-1b" in result.stdout
    assert "-m pmrlhf demo --out" in result.stdout
    # the benchmark's own dry run resolved the 1B plan, and pytest found the CUDA tests
    assert "1038682112 parameters" in rows["d bench"][2]
    assert "tests collected" in rows["c tests"][2]
    assert (tmp_path / "out" / "summary.txt").read_text().strip().endswith(rows["e demo"][2])


def test_dry_run_fails_on_an_option_the_demo_lacks(tmp_path):
    result = dry_run(tmp_path, "--only", "e", DEMO_ARGS="--no-such-option 3")
    assert result.returncode == 1
    assert "no option --no-such-option" in result.stdout
    assert summary_rows(result.stdout)["e demo"][0] == "FAILED"


def test_rejects_unknown_arguments(tmp_path):
    result = dry_run(tmp_path, "--only", "z")
    assert result.returncode == 2 and "--only" in result.stderr
