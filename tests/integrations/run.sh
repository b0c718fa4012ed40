#!/usr/bin/env bash
# `make test-integrations`: build the framework test environments when their pins change, then run
# tests/integrations in each. TRL is tested at the newest (requirements-trl.txt) and the oldest
# version pmrlhf.integrations.trl supports (installed next to it, same other packages); verl and
# OpenRLHF share one environment (verl needs transformers < 5.11; OpenRLHF is installed --no-deps).
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
TRL_OLDEST=1.5.0
OPENRLHF=0.11.2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PIP_DISABLE_PIP_VERSION_CHECK=1

fresh() {  # fresh STAMP FILES...: is STAMP newer than every file?
  local stamp=$1
  shift
  [ -f "$stamp" ] || return 1
  for f in "$@"; do [ "$stamp" -nt "$f" ] || return 1; done
}

build() {  # build VENV REQUIREMENTS: a venv with torch first, the pins, and pmrlhf (editable)
  local venv=$1 req=$2
  "$PYTHON" -m venv "$venv" &&
    "$venv/bin/pip" install --quiet torch==2.13.0 &&
    "$venv/bin/pip" install --quiet -r "$req" &&
    "$venv/bin/pip" install --quiet --no-deps -e .
}

set -e
if ! fresh .venv-trl/.installed requirements-trl.txt requirements-dev.txt pyproject.toml "$0"; then
  rm -rf .venv-trl
  build .venv-trl requirements-trl.txt
  .venv-trl/bin/pip install --quiet --no-deps --target .venv-trl/trl-oldest "trl==$TRL_OLDEST"
  touch .venv-trl/.installed
fi
if ! fresh .venv-verl/.installed requirements-verl.txt pyproject.toml "$0"; then
  rm -rf .venv-verl
  build .venv-verl requirements-verl.txt
  .venv-verl/bin/pip install --quiet --no-deps "openrlhf==$OPENRLHF"
  touch .venv-verl/.installed
fi
set +e

status=0
echo "== TRL (newest)"
PMRLHF_EXPECT_TRL=$(.venv-trl/bin/python -c "import importlib.metadata as m; print(m.version('trl'))") \
  .venv-trl/bin/python -m pytest tests/integrations/test_trl.py -q "$@" || status=1
echo "== TRL $TRL_OLDEST (oldest supported)"
PYTHONPATH=.venv-trl/trl-oldest PMRLHF_EXPECT_TRL=$TRL_OLDEST \
  .venv-trl/bin/python -m pytest tests/integrations/test_trl.py -q "$@" || status=1
echo "== verl and OpenRLHF"
.venv-verl/bin/python -m pytest tests/integrations/test_verl.py tests/integrations/test_openrlhf.py \
  -q -W ignore::UserWarning "$@" || status=1
exit $status
