#!/usr/bin/env bash
# Every GPU figure in one command (< 8 minutes on one H100): run it whenever a CUDA machine is lent.
#   bash benchmarks/gpu_suite.sh            # logs in benchmarks/gpu_logs/<date>/, a section appended to benchmarks/RESULTS.md
# 1. masked-loss kernel table (eager / torch.compile / Triton; fp32, bf16; three shapes)
# 2. whole training step: plain vs ambient (overhead), fused vs eager masked loss, at 32x32 and 64x64
# 3. the same step with torch.compile and channels-last
# 4. all-pairs 4x4 tiled l2 over 65,536 32x32 RGB generations (the clique filter's work)
# 5. the GPU-marked tests
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: nothing to measure"; exit 1; }
LOGS=${LOGS:-benchmarks/gpu_logs/$(date -u +%Y-%m-%d_%H%M)}
mkdir -p "$LOGS"
run() {  # name, limit in seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1; echo "exit $?" >> "$LOGS/$name.txt"
    tail -n 12 "$LOGS/$name.txt"
}
run masked_loss 120 python benchmarks/masked_loss.py
run step_32 60 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --eager-too
run step_64 60 python benchmarks/step_overhead.py --device cuda --resolution 64 --channels 3 --batch 64 --repeats 20 --warmup 5 --eager-too
run step_32_compile 120 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --compile
run step_32_channels_last 60 python benchmarks/step_overhead.py --device cuda --resolution 32 --batch 128 --repeats 30 --warmup 5 --channels-last
run tiled_l2_65536 120 python benchmarks/tiled_distance.py --n 65536 --size 32 --loop-rows 1 --block-size 8192 --device cuda
run gpu_tests 60 python -m pytest -q -m gpu -p no:cacheprovider
python benchmarks/collect_results.py "$LOGS" >> benchmarks/RESULTS.md
echo "appended to benchmarks/RESULTS.md (logs: $LOGS)"
