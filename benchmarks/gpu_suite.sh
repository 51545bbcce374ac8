#!/usr/bin/env bash
# Every GPU figure in one command (< 8 minutes on one H100): run it whenever a CUDA machine is lent.
#   bash benchmarks/gpu_suite.sh            # logs in benchmarks/gpu_logs/<date>/, a section appended to benchmarks/RESULTS.md
#   ONLY="step_32 step_64" bash benchmarks/gpu_suite.sh    # just those runs
# 1. masked-loss kernel table (eager / torch.compile / Triton; fp32, bf16; three training shapes, then
#    two large ones where the loss is bandwidth-bound rather than launch-bound)
# 2. whole training step: plain vs ambient (overhead), fused vs eager masked loss, at 32x32 and 64x64,
#    steady state (per-image draws cached) and the first epoch (cold cache)
# 3. the same step with torch.compile and channels-last
# 4. all-pairs 4x4 tiled l2 over 65,536 32x32 RGB generations (the clique filter's work)
# 5. the GPU-marked tests
# On a bare lent machine (PyTorch and Triton installed, no diffusers/hydra/omegaconf), carry wheels:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers omegaconf hydra-core importlib_metadata
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# and there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: nothing to measure"; exit 1; }
LOGS=${LOGS:-benchmarks/gpu_logs/$(date -u +%Y-%m-%d_%H%M)}
mkdir -p "$LOGS"
run() {  # name, limit in seconds, command...
    local name=$1 limit=$2; shift 2
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    echo "== $name: $*"
    timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1; echo "exit $?" >> "$LOGS/$name.txt"
    tail -n 12 "$LOGS/$name.txt"
}
run masked_loss 120 python benchmarks/masked_loss.py
run masked_loss_large 180 python benchmarks/masked_loss.py --shapes 128x3x512x512,16x4x1024x1024 --repeats 10 --inner 5 --blocks 1024,2048,8192
run step_32 60 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --fused-too
run step_64 60 python benchmarks/step_overhead.py --device cuda --resolution 64 --channels 3 --batch 64 --repeats 20 --warmup 5 --fused-too
run step_32_cold 60 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 10 --warmup 2 --cold-cache
run step_32_compile 120 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --compile
run step_32_channels_last 60 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --channels-last
run tiled_l2_65536 120 python benchmarks/tiled_distance.py --n 65536 --size 32 --loop-rows 1 --naive-rows 2048 --block-size 8192 --filter-block-size 8192 --device cuda
run gpu_tests 60 python -m pytest -q -m gpu -p no:cacheprovider
python benchmarks/collect_results.py "$LOGS" >> benchmarks/RESULTS.md
echo "appended to benchmarks/RESULTS.md (logs: $LOGS)"
