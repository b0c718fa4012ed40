#!/usr/bin/env bash
# Download the Python wheels that benchmarks/gpu_check.sh installs on a GPU machine without network.
#
#   bash benchmarks/gpu_wheels.sh            # the packages a CUDA image with torch/transformers/accelerate lacks
#   bash benchmarks/gpu_wheels.sh --all      # also pmrlhf's other dependencies and the test tools
#   bash benchmarks/gpu_wheels.sh --list     # print the pinned list, download nothing
#
# Run it on a machine with access to PyPI. The wheels go to benchmarks/wheels/ (WHEELS_DIR to
# change it; the folder is git-ignored), built for the GPU machine's interpreter: CPython
# ${GPU_PYTHON:-3.12} on x86-64 Linux. Every package is fetched on its own (--no-deps), so torch,
# transformers and accelerate, which the GPU machine already has, are never downloaded.
# gpu_check.sh then installs only what the GPU machine is missing, resolving against what it has.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${WHEELS_DIR:-$ROOT/benchmarks/wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PYTHON=${PYTHON:-python3}

# What the benchmark's TRL side needs beyond a CUDA image that has torch, transformers,
# accelerate, pandas, pyarrow, huggingface-hub and xxhash: trl itself and the datasets library.
# fsspec is pinned because datasets 5.2 accepts fsspec <= 2026.9.0 only.
CORE=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
)
# pmrlhf's own dependencies and the test tools. Images with PyTorch usually have them already;
# --all carries them anyway, for a bare image.
EXTRA=(
    peft==0.21.2
    safetensors==0.8.0
    tqdm==4.70.1
    pyyaml==6.0.3
    matplotlib==3.11.2
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    hypothesis==6.170.17
    sortedcontainers==2.4.0
)

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

packages=("${CORE[@]}")
list_only=0
for arg in "$@"; do
    case $arg in
        --all) packages+=("${EXTRA[@]}") ;;
        --list) list_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ $list_only == 1 ]]; then
    printf '%s\n' "${packages[@]}"
    exit 0
fi

mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$tag")
done
py_tag=${GPU_PYTHON//./}
for spec in "${packages[@]}"; do
    name=${spec%%==*}
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$GPU_PYTHON" --implementation cp --abi "cp$py_tag" --abi abi3 --abi none \
        "${platforms[@]}" --dest "$DEST" "$spec" ||
        { echo "gpu_wheels.sh: could not download $spec ($name)" >&2; exit 1; }
done

echo "wheels in $DEST:"
(cd "$DEST" && ls -1 ./*.whl | sed 's|^\./|  |')
echo "total: $(du -sh "$DEST" | cut -f1) ($(du -sb "$DEST" | cut -f1) bytes)"
