"""`pmrlhf --help` and `pmrlhf exact` start without importing transformers, accelerate or datasets."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "accelerate", "datasets", "peft")

_PROBE = """
import contextlib, io, json, sys
from pmrlhf.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main({argv!r})
print(json.dumps({{"code": code, "loaded": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def _run(argv: list[str]) -> dict:
    script = _PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_top_level_help_imports_no_heavy_library():
    result = _run([])
    assert result == {"code": 0, "loaded": []}


def test_exact_imports_no_heavy_library():
    result = _run(["exact", "--json"])
    assert result == {"code": 0, "loaded": []}
