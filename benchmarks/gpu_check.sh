#!/usr/bin/env bash
# The prepared GPU check: pmrlhf's CUDA path end to end, in about 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: print the plan, check every file/command/option
#   bash benchmarks/gpu_check.sh --only c,d  # some stages only (a to e; the summary always runs)
#
# Stages (each runs on its own, under its own time budget, and a failed stage does not stop the next):
#   a  env      GPU, driver, torch/transformers/accelerate/trl/... versions, carried wheels
#   b  wheels   install what the machine lacks from benchmarks/wheels/ (no network needed)
#   c  tests    pytest -m cuda tests/test_cuda.py (bf16 rollout vs scoring log-probs, RL steps
#               of every algorithm, the bandit's closed form, bounded decoding recompiles)
#   d  bench    benchmarks/bench_rloo.py --device cuda --preset gpu-1b (TRL in the same process)
#   e  demo     pmrlhf demo on the GPU
#   f  summary  one table: stage, status, seconds, key numbers
#
# Everything the run writes that is worth keeping goes to ${OUT:-runs/gpu_check} (at most 8 files:
# summary.txt, a_env.log, b_wheels.log, c_tests.log, d_bench.log, d_bench.json, e_demo.log,
# e_demo_report.md); scratch (the demo's models, data, plots) goes to $GPU_CHECK_WORK.
#
# Prepare the wheels on a machine with PyPI access first: `bash benchmarks/gpu_wheels.sh`
# (about 2 MB: trl, datasets and their missing dependencies; `--all` about 16 MB). The folder is
# git-ignored, so a copy of the working tree must carry benchmarks/wheels explicitly.
#
# Environment: PYTHON (python3), OUT, GPU_CHECK_WORK, WHEELS_DIR (benchmarks/wheels),
# BENCH_ARGS ("--warmup 2 --steps 4"), DEMO_ARGS ("--rl-steps 100 --eval-samples 200": a shortened
# demo; DEMO_ARGS="" runs the full one), and the per-stage budgets in seconds BUDGET_ENV (15),
# BUDGET_WHEELS (35), BUDGET_TESTS (150), BUDGET_BENCH (190), BUDGET_DEMO (80): 470 s in all.
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY_RUN=0
ONLY=a,b,c,d,e
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --only)
            ONLY=${2:-}
            shift
            [[ $ONLY =~ ^[a-e](,[a-e])*$ ]] || { echo "gpu_check.sh: --only takes stage letters a-e, e.g. c,d" >&2; exit 2; }
            ;;
        -h | --help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --only or --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
WHEELS_DIR=${WHEELS_DIR:-benchmarks/wheels}
BENCH_ARGS=${BENCH_ARGS:---warmup 2 --steps 4}
DEMO_ARGS=${DEMO_ARGS:---rl-steps 100 --eval-samples 200}
BUDGET_ENV=${BUDGET_ENV:-15}
BUDGET_WHEELS=${BUDGET_WHEELS:-35}
BUDGET_TESTS=${BUDGET_TESTS:-150}
BUDGET_BENCH=${BUDGET_BENCH:-190}
BUDGET_DEMO=${BUDGET_DEMO:-80}
# trl and datasets for the benchmark's TRL side; the rest are pmrlhf's and the tests' needs
REQUIREMENTS=(trl==1.16.0 datasets pytest hypothesis peft safetensors matplotlib tqdm pyyaml)
IMPORTS="trl datasets pytest hypothesis peft safetensors matplotlib tqdm yaml"

mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
if [[ -z ${GPU_CHECK_WORK:-} ]]; then
    if [[ $OUT == "$ROOT"/runs/* ]]; then GPU_CHECK_WORK=$OUT/work; else GPU_CHECK_WORK=${TMPDIR:-/tmp}/pmrlhf_gpu_check; fi
fi
mkdir -p "$GPU_CHECK_WORK"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MPLBACKEND=Agg

# ------------------------------------------------------------------------------ bookkeeping
STAGES=()
declare -A STATUS SECONDS_TAKEN NOTES
SUMMARY_DONE=0

note() { NOTES[$1]="${NOTES[$1]:+${NOTES[$1]}; }$2"; }

# run_stage ID NAME BUDGET FUNCTION: runs FUNCTION with $BUDGET seconds available (the function
# wraps its long commands in `timeout`), records status and wall time.
run_stage() {
    local id=$1 name=$2 budget=$3 fn=$4 start rc
    STAGES+=("$id")
    STATUS[$id]="running"
    SECONDS_TAKEN[$id]=0
    NOTES[$id]=""
    echo
    echo "=== stage $id: $name (budget ${budget}s) ==="
    start=$(date +%s)
    STAGE_BUDGET=$budget
    "$fn"
    rc=$?
    SECONDS_TAKEN[$id]=$(($(date +%s) - start))
    case $rc in
        0) STATUS[$id]="ok" ;;
        3) STATUS[$id]="warn" ;;
        4) STATUS[$id]="skipped" ;;
        124 | 137) STATUS[$id]="TIMEOUT"; note "$id" "stopped after its ${budget}s budget" ;;
        *) STATUS[$id]="FAILED"; note "$id" "exit code $rc" ;;
    esac
    echo "=== stage $id: ${STATUS[$id]} in ${SECONDS_TAKEN[$id]}s ==="
}

# bounded CMD...: the command under the stage's time budget, killed 10 s after it runs out
bounded() { timeout --kill-after=10 "$STAGE_BUDGET" "$@"; }

# show CMD...: print a command the way it would be run
show() { printf '  $'; printf ' %q' "$@"; printf '\n'; }

py_json() {  # py_json FILE EXPR: print EXPR evaluated on the JSON object in FILE as `d`
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(eval(sys.argv[2], {"d": d}))
except Exception as error:  # a missing key is a finding, not a crash of the summary
    print(f"unreadable ({type(error).__name__}: {error})")
EOF
}

# ------------------------------------------------------------------------------ a: environment
stage_env() {
    local log=$OUT/a_env.log rc=0
    {
        echo "date: $(date -u)"
        echo "host: $(uname -a)"
        echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
        if command -v nvidia-smi >/dev/null; then
            bounded nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        else
            echo "nvidia-smi: not found"
        fi
        bounded "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "accelerate", "trl", "datasets", "peft", "safetensors", "pytest",
             "hypothesis", "matplotlib", "tqdm", "pyyaml", "numpy", "pyarrow", "fsspec"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
EOF
        echo "carried wheels in $WHEELS_DIR:"
        ls -l "$WHEELS_DIR"/*.whl 2>/dev/null | awk '{print "  " $5 " " $9}' || echo "  (none)"
    } >"$log" 2>&1 || rc=$?
    cat "$log"
    local torch_line device_line
    torch_line=$(grep -m1 '^torch ' "$log")
    device_line=$(grep -m1 '^device ' "$log")
    note a "${device_line:-no CUDA device}; ${torch_line:-torch not importable}"
    note a "$(grep -E '^(transformers|accelerate|trl) ' "$log" | tr '\n' ' ' | sed 's/ $//')"
    [[ $rc == 0 ]] || return $rc
    grep -q 'available True' "$log" || { note a "torch sees no CUDA device"; return 1; }
}

stage_env_dry() {
    local missing=0 cmd
    for cmd in "$PYTHON" timeout awk grep sed du; do
        command -v "$cmd" >/dev/null || { echo "  missing command: $cmd"; missing=1; }
    done
    command -v nvidia-smi >/dev/null || echo "  (nvidia-smi not here; the GPU machine has it)"
    "$PYTHON" -c 'import importlib.metadata as md; print("  " + " | ".join(n + " " + md.version(n) for n in ("torch", "transformers", "accelerate")))' || missing=1
    note a "would report GPU, driver, package versions, carried wheels"
    return $missing
}

# ------------------------------------------------------------------------------ b: wheels
missing_imports() {  # prints the modules of $IMPORTS that do not import; versions go to stderr
    "$PYTHON" - $IMPORTS <<'EOF'
import importlib, sys
found = []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        found.append(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:
        print(name)
        found.append(f"{name} MISSING ({type(error).__name__}: {error})")
print("  imports: " + ", ".join(found), file=sys.stderr)
EOF
}

uninstalled_wheels() {  # prints the wheels in $WHEELS_DIR whose distribution is not installed
    "$PYTHON" - "$WHEELS_DIR" <<'EOF'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
}

pip_offline() { bounded "$PYTHON" -m pip install --no-index --no-cache-dir --no-compile --progress-bar off "$@"; }

stage_wheels() {
    local log=$OUT/b_wheels.log rc=0 missing todo=()
    {
        missing=$(missing_imports | tr '\n' ' ')
        echo "missing before: ${missing:-nothing}"
        if [[ -z $missing ]]; then
            echo "everything imports; nothing to install"
        elif ! ls "$WHEELS_DIR"/*.whl >/dev/null 2>&1; then
            echo "no wheels in $WHEELS_DIR: run benchmarks/gpu_wheels.sh where PyPI is reachable and carry the folder"
        else
            # 1. the carried distributions this machine lacks, as they are (no resolver: fast, and
            #    nothing already installed is touched)
            mapfile -t todo < <(uninstalled_wheels)
            echo "--- installing the ${#todo[@]} carried wheels whose distributions are not installed, without dependencies"
            [[ ${#todo[@]} == 0 ]] || pip_offline --no-deps "${todo[@]}" || echo "--- that install failed"
            missing=$(missing_imports | tr '\n' ' ')
            # 2. an installed version may be too old for what needs it: resolve against the wheels
            if [[ -n $missing ]]; then
                echo "--- still missing: $missing; resolving ${REQUIREMENTS[*]} against the wheels"
                pip_offline --find-links "$WHEELS_DIR" "${REQUIREMENTS[@]}" || echo "--- that install failed"
                missing=$(missing_imports | tr '\n' ' ')
            fi
            # 3. site-packages not writable: unpack into a folder of our own
            if [[ -n $missing ]]; then
                echo "--- still missing: $missing; unpacking the uninstalled wheels into $GPU_CHECK_WORK/site"
                mapfile -t todo < <(uninstalled_wheels)
                [[ ${#todo[@]} == 0 ]] || pip_offline --no-deps --target "$GPU_CHECK_WORK/site" "${todo[@]}"
                export PYTHONPATH="$PYTHONPATH:$GPU_CHECK_WORK/site"
                missing=$(missing_imports | tr '\n' ' ')
            fi
        fi
        echo "missing after: ${missing:-nothing}"
    } >"$log" 2>&1
    cat "$log"
    [[ -z $missing ]] || rc=1
    note b "$(grep -m1 '^missing before' "$log")"
    note b "$(grep -m1 '^missing after' "$log")"
    return $rc
}

stage_wheels_dry() {
    show "$PYTHON" -m pip install --no-index --find-links "$WHEELS_DIR" --no-cache-dir --no-compile "${REQUIREMENTS[@]}"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || { echo "  pip is not available to $PYTHON"; return 1; }
    if ls "$WHEELS_DIR"/*.whl >/dev/null 2>&1; then
        local count size
        count=$(ls "$WHEELS_DIR"/*.whl | wc -l)
        size=$(du -sh "$WHEELS_DIR" | cut -f1)
        echo "  $count wheels, $size in $WHEELS_DIR"
        note b "$count wheels ($size) ready"
        return 0
    fi
    echo "  no wheels in $WHEELS_DIR yet: run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable"
    note b "no wheels yet (benchmarks/gpu_wheels.sh)"
    return 3
}

# ------------------------------------------------------------------------------ c: CUDA tests
TEST_CMD=(-m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider --durations=8)

stage_tests() {
    local log=$OUT/c_tests.log rc=0
    bounded "$PYTHON" "${TEST_CMD[@]}" >"$log" 2>&1 || rc=$?
    tail -n 40 "$log"
    local last
    last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    note c "${last:-no pytest summary line}"
    local failed
    failed=$(grep -E '^(FAILED|ERROR) ' "$log" | sed 's/ - .*//; s/^\(FAILED\|ERROR\) tests\/test_cuda.py:://' | tr '\n' ' ')
    [[ -z $failed ]] || note c "failed: $failed"
    if [[ $rc == 0 ]] && grep -q 'skipped' <<<"$last"; then
        note c "some CUDA tests were skipped"
        return 3
    fi
    return $rc
}

stage_tests_dry() {
    show "$PYTHON" "${TEST_CMD[@]}"
    [[ -f tests/test_cuda.py ]] || { echo "  missing tests/test_cuda.py"; return 1; }
    local collected
    collected=$("$PYTHON" -m pytest -m cuda tests/test_cuda.py --collect-only -q -p no:cacheprovider 2>&1 | tail -n 1)
    echo "  collect-only: $collected"
    grep -qE '^[0-9]+(/[0-9]+)? tests? (collected|selected)' <<<"$collected" || return 1
    note c "$collected"
}

# ------------------------------------------------------------------------------ d: benchmark
bench_sides() {  # TRL is only compared when it imports
    if "$PYTHON" -c "import trl, datasets" >/dev/null 2>&1; then echo "trl,kl,pm"; else echo "kl,pm"; fi
}

stage_bench() {
    local log=$OUT/d_bench.log json=$OUT/d_bench.json rc=0 sides
    sides=$(bench_sides)
    [[ $sides == *trl* ]] || note d "trl/datasets do not import: TRL side skipped"
    rm -f "$json"
    local start=$SECONDS left
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    bounded "$PYTHON" benchmarks/bench_rloo.py --device cuda --preset gpu-1b --sides "$sides" \
        $BENCH_ARGS --json "$json" >"$log" 2>&1 || rc=$?
    left=$((STAGE_BUDGET - (SECONDS - start)))
    if [[ ! -f $json && $rc != 124 && $rc != 137 && $sides == *trl* && $left -gt 60 ]]; then
        # a TRL failure must not cost the pmrlhf numbers: once more without TRL, in the time left
        tail -n 15 "$log"
        echo "--- the run with TRL failed (exit $rc); again without it (${left}s left)" | tee -a "$log"
        note d "the run with TRL failed (exit $rc): pmrlhf sides only"
        rc=0
        # shellcheck disable=SC2086
        timeout --kill-after=10 "$left" "$PYTHON" benchmarks/bench_rloo.py --device cuda \
            --preset gpu-1b --sides kl,pm $BENCH_ARGS --json "$json" >>"$log" 2>&1 || rc=$?
        [[ $rc != 0 ]] || rc=3
    fi
    tail -n 30 "$log"
    if [[ -f $json ]]; then
        note d "$(py_json "$json" '"pmrlhf kl %s s/step, pm %s s/step, TRL %s s/step; TRL/pmrlhf %s; pm/kl %s; goal %s; %s, %s" % (d.get("pmrlhf_kl", {}).get("seconds_per_step"), d.get("pmrlhf_pm", {}).get("seconds_per_step"), d.get("trl", {}).get("seconds_per_step"), d.get("ratio_pmrlhf_over_trl"), d.get("ratio_pm_over_kl_step_time"), d.get("goal"), d.get("preset"), d.get("machine", {}).get("gpu", d.get("machine", {}).get("device")))')"
    else
        note d "no JSON written"
    fi
    return $rc
}

stage_bench_dry() {
    local sides json=$GPU_CHECK_WORK/bench_plan.json
    sides=$(bench_sides)
    # shellcheck disable=SC2086
    show "$PYTHON" benchmarks/bench_rloo.py --device cuda --preset gpu-1b --sides "$sides" $BENCH_ARGS --json "$OUT/d_bench.json"
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/bench_rloo.py --device cuda --preset gpu-1b --sides "$sides" $BENCH_ARGS \
        --dry-run >"$json" || return 1
    note d "$(py_json "$json" '"plan: %s parameters, %s completions x %s tokens, %s timed steps, sides %s" % (d["model"]["parameters"], d["batch"]["completions_per_step"], d["batch"]["new_tokens"], d["timed_steps"], ",".join(d["sides"]))')"
    [[ $sides == *trl* ]] || { note d "trl does not import here"; return 3; }
}

# ------------------------------------------------------------------------------ e: demo
DEMO_OUT=$GPU_CHECK_WORK/demo-cuda

demo_command() {  # fills DEMO_CMD; the demo takes --device only if it has that option
    local help
    help=$("$PYTHON" -m pmrlhf demo --help 2>&1) || { echo "$help"; return 1; }
    DEMO_CMD=(-m pmrlhf demo --out "$DEMO_OUT")
    if grep -q -- '--device' <<<"$help"; then
        DEMO_CMD+=(--device cuda)
        DEMO_HAS_DEVICE=1
    else
        DEMO_HAS_DEVICE=0
    fi
    local option
    for option in $DEMO_ARGS; do
        if [[ $option == --* ]] && ! grep -qE -- "${option%%=*}( |=|,|$)" <<<"$help"; then
            echo "pmrlhf demo has no option $option (DEMO_ARGS)"
            return 1
        fi
    done
    # shellcheck disable=SC2206
    DEMO_CMD+=($DEMO_ARGS)
}

stage_demo() {
    local log=$OUT/e_demo.log rc=0
    demo_command >"$log" 2>&1 || { cat "$log"; return 1; }
    [[ $DEMO_HAS_DEVICE == 1 ]] ||
        note e "pmrlhf demo has no --device option: ran with its own device choice (RL on CUDA when present)"
    rm -rf "$DEMO_OUT"
    bounded "$PYTHON" "${DEMO_CMD[@]}" >>"$log" 2>&1 || rc=$?
    tail -n 20 "$log"
    if [[ -f $DEMO_OUT/metrics.json ]]; then
        cp "$DEMO_OUT/report.md" "$OUT/e_demo_report.md" 2>/dev/null
        note e "$(py_json "$DEMO_OUT/metrics.json" '"%.0f s; " % d["seconds"] + "; ".join("%s: TV->target %.3f, minority %.3f, invalid %.3f, PMD %.3f" % (m, r["tv_to_target"], r["minority_mass"], r["invalid_rate"], r["pmd"]) for m, r in d["methods"].items()) + "; PMD improvement over kl: %s" % {m: round(v, 3) for m, v in d.get("pmd_improvement", {}).items()}')"
    else
        note e "no metrics.json"
    fi
    return $rc
}

stage_demo_dry() {
    demo_command || return 1
    show "$PYTHON" "${DEMO_CMD[@]}"
    if [[ $DEMO_HAS_DEVICE == 1 ]]; then
        note e "demo takes --device"
    else
        note e "pmrlhf demo has no --device option; it would run with its own device choice"
        return 3
    fi
}

# ------------------------------------------------------------------------------ f: summary
summary() {
    [[ $SUMMARY_DONE == 1 ]] && return
    SUMMARY_DONE=1
    local file=$OUT/summary.txt id
    {
        echo
        echo "pmrlhf GPU check$([[ $DRY_RUN == 1 ]] && echo ' (dry run)'), $(date -u '+%Y-%m-%d %H:%M UTC'), total ${SECONDS}s"
        printf '%-8s | %-8s | %7s | %s\n' stage status seconds "key numbers"
        printf '%s\n' "---------+----------+---------+------------------------------------------------"
        for id in "${STAGES[@]}"; do
            printf '%-8s | %-8s | %7s | %s\n' "$id ${NAMES[$id]}" "${STATUS[$id]}" "${SECONDS_TAKEN[$id]}" "${NOTES[$id]}"
        done
    } | tee "$file"
}
trap summary EXIT
trap 'note "${STAGES[-1]:-a}" "interrupted"; exit 130' INT TERM

declare -A NAMES=([a]=env [b]=wheels [c]=tests [d]=bench [e]=demo)
declare -A TITLES=([a]="environment" [b]="wheels" [c]="CUDA tests" [d]="bench_rloo gpu-1b" [e]="demo")
declare -A BUDGETS=([a]=$BUDGET_ENV [b]=$BUDGET_WHEELS [c]=$BUDGET_TESTS [d]=$BUDGET_BENCH [e]=$BUDGET_DEMO)
declare -A FUNCTIONS=([a]=stage_env [b]=stage_wheels [c]=stage_tests [d]=stage_bench [e]=stage_demo)
suffix=""
[[ $DRY_RUN == 1 ]] && suffix=_dry
echo "gpu_check.sh$([[ $DRY_RUN == 1 ]] && echo ' --dry-run'): stages $ONLY, PYTHON=$PYTHON, OUT=$OUT, scratch $GPU_CHECK_WORK"
for id in a b c d e; do
    [[ ,$ONLY, == *,$id,* ]] || continue
    run_stage "$id" "${TITLES[$id]}" "${BUDGETS[$id]}" "${FUNCTIONS[$id]}$suffix"
done
summary
failed=0
for id in "${STAGES[@]}"; do
    case ${STATUS[$id]} in ok | warn | skipped) ;; *) failed=1 ;; esac
done
exit $failed
