#!/usr/bin/env bash
# The sampler benchmark on a GPU machine that has Python and torch but no package registry (such as the
# lent H200 of this project's sessions): `distpg bench sampler` needs neither Ray nor pyarrow, only
# transformers (the reference) and what it imports, carried as wheels.
#
#   bash cluster/gpu-bench.sh prepare    # here, with a registry: wheels for CPython 3.12 into .device/bench/
#   bash cluster/gpu-bench.sh run        # there, from the project root: writes $OUT/gpu-sampler.json (or ./)
#
# `run` prints the GPU (nvidia-smi), then every sampler case the issue's GPU goals name: GPT-2 124M at batch 64
# and 256 with 64 new tokens (goal: 3x transformers), in float32 and bfloat16, plus the small cases; each
# figure with the memory-bandwidth and compute bounds measured on that GPU. Env: PYTHON (default python3),
# SIZES (comma-separated cases), REPEATS (default 3), DEVICE (default cuda), and for prepare PYVER (the
# target machine's Python, default 3.12; the tests use this machine's to try the whole path on a CPU) and
# BENCH_DIR (where the wheels go, default .device/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BENCH_DIR:-.device/bench}
case "${1:-}" in
  prepare)
    py=${PYTHON:-python3}
    plat=(--only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
    rm -rf "$dir" && mkdir -p "$dir/wheels"
    [ -d .git ] && { grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude; }
    # transformers and everything it imports, without torch and numpy (the GPU machine's image has them)
    "$py" -m pip download -q "${plat[@]}" -d "$dir/wheels" "transformers>=4.40,<6" pyyaml
    rm -f "$dir"/wheels/torch-* "$dir"/wheels/numpy-* "$dir"/wheels/nvidia_* "$dir"/wheels/triton-*
    du -sh "$dir"
    echo "carry .device/bench to the GPU machine, then: bash cluster/gpu-bench.sh run"
    ;;
  run)
    py=${PYTHON:-python3}
    site=/tmp/distpg-bench-site
    out=${OUT:-.}
    [ -d "$dir/wheels" ] || { echo "no $dir/wheels: run 'bash cluster/gpu-bench.sh prepare' where pip can download" >&2; exit 2; }
    mkdir -p "$site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/wheels/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    "$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
                                             "transformers", transformers.__version__)'
    sizes=${SIZES:-tiny,small,small-charvocab,small-bf16,gpt2-b64,gpt2-b256,gpt2-b64-bf16,gpt2-b256-bf16}
    "$py" -m distpg bench sampler --device "${DEVICE:-cuda}" --sampler-sizes "$sizes" --repeats "${REPEATS:-3}" \
      --json "$out/gpu-sampler.json"
    ;;
  *)
    echo "usage: bash cluster/gpu-bench.sh prepare|run" >&2
    exit 2
    ;;
esac
