#!/usr/bin/env bash
# Everything this project checks on a GPU machine, in one call of bounded length (a lent machine is
# held for minutes, so the call is sized to a time budget and every step is cut off by `timeout`):
#
#   1. the tests marked `gpu` (torch-cuda fp16/bf16 runner, its GPU latency; TensorRT ones skip
#      where TensorRT is not installed);
#   2. the peer benchmark (benchmarks/compare.py) trained on the GPU, --jobs processes at a time:
#      a 2-epoch probe of --jobs parallel LAPP runs times an epoch under that contention, and the
#      epoch budget is the largest that fits what is left of TOTAL_S (at most 30, at least 3);
#      latency is not measured there (--no-latency): re-run the same compare command on the CPU
#      machine whose latency you want, with the unpacked folder as --out, and only latency runs;
#   3. benchmarks/gpu_check.py (single-process training speed, torch-cuda latency, 2-process DDP)
#      in what time is left;
#   4. `lapp-edge latency-check` on the torch-cuda target;
#   baseline (only when STEPS names it, and first: nothing else may load the GPU while it measures):
#      `lapp-edge baseline --target gpu-torch-cuda-fp16` records this GPU's dense/slim speedups in the
#      profile (keyed by GPU and host CPU), then `make latency-test TARGET=gpu-torch-cuda-fp16`'s test
#      holds the target to them; the updated profile YAML comes back in the results.
#
# Usage (from the repository root, Fashion-MNIST in $DATA or its standard place):
#   OUT=out-dir [DATA=.fmnist] [WHEELS=.whl] [TOTAL_S=540] [JOBS=14] bash benchmarks/gpu_session.sh
# Choosing what runs: STEPS (default "tests compare gpucheck"; add "baseline"), and for the peer
# benchmark EPOCHS (a fixed epoch budget instead of the probe's choice), TARGETS (0.3,0.5), SEEDS
# (0,1), METHODS (compare.py's default list), TRAIN_SUBSET (0: all 60 000), PRUNE_EPOCHS (0: compare's
# default, 20% of the budget). Runs start dense first, then per target and seed in order, so a
# budget cut leaves whole seeds.
# Writes OUT/session.log and OUT/results.tgz.part-* (cat them together, then tar xzf): the compare
# folder without checkpoints, the gpu-check JSON and table, the test and check output.
# Local dry run of the same steps on the CPU: DEVICE=cpu TOTAL_S=200 JOBS=2 SMALL=1 OUT=/tmp/x bash ...
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:?set OUT to the folder that receives the results}
PY=${PY:-python3}
DATA=${DATA:-.fmnist}
WHEELS=${WHEELS:-.whl}
TOTAL_S=${TOTAL_S:-540}
JOBS=${JOBS:-14}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-}
STEPS=${STEPS:-tests compare gpucheck}
EPOCHS=${EPOCHS:-}
TARGETS=${TARGETS:-0.3,0.5}
SEEDS=${SEEDS:-0,1}
TRAIN_SUBSET=${TRAIN_SUBSET:-0}
PRUNE_EPOCHS=${PRUNE_EPOCHS:-0}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
WORK=${WORK:-/tmp/gpu-session}
T0=$SECONDS
left() { echo $(( TOTAL_S - (SECONDS - T0) )); }
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f $FMNIST/train-images-idx3-ubyte.gz ] && [ -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    mkdir -p $FMNIST && cp "$DATA"/*.gz $FMNIST/
fi
rm -rf "$WORK"; mkdir -p "$WORK"

echo "== environment ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
uptime
"$PY" - <<'EOF'
import platform, torch, onnx, onnxruntime
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "| onnx", onnx.__version__, "| onnxruntime", onnxruntime.__version__)
try:
    import torch_pruning; print("torch_pruning", torch_pruning.__version__)
except ImportError as error:
    print("torch_pruning missing:", error)
EOF

if has_step baseline; then
    PROFILE=lapp_edge/resources/targets/gpu-torch-cuda-fp16.yaml
    echo "== 0. torch-cuda latency baseline, then its regression test ($(left) s left)"
    timeout "${BASELINE_S:-150}" "$PY" -m lapp_edge baseline --target gpu-torch-cuda-fp16 > "$WORK/baseline.txt" 2>&1
    echo "baseline exit $?"; tail -12 "$WORK/baseline.txt"
    LAPP_EDGE_LATENCY_TARGET=gpu-torch-cuda-fp16 timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m latency \
        tests/latency/test_regression.py > "$WORK/latency-test.txt" 2>&1
    echo "latency-test exit $?"; tail -8 "$WORK/latency-test.txt"
    cp "$PROFILE" "$WORK/gpu-torch-cuda-fp16.yaml"
fi

if has_step tests; then
    echo "== 1. tests marked gpu ($(left) s left)"
    timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests > "$WORK/pytest-gpu.txt" 2>&1
    echo "pytest exit $?"; tail -25 "$WORK/pytest-gpu.txt"
fi

GPU_CHECK_S=${GPU_CHECK_S:-100}
has_step gpucheck || GPU_CHECK_S=0
if has_step compare; then
echo "== 2. peer benchmark on $DEVICE, $JOBS at a time ($(left) s left)"
COMMON=(--device "$DEVICE" --jobs "$JOBS" --threads 1 --no-latency --train-subset "$TRAIN_SUBSET" --prune-epochs "$PRUNE_EPOCHS")
METHODS=(${METHODS:+--methods "$METHODS"})
if [ -n "$SMALL" ]; then COMMON+=(--train-subset 512 --test-subset 300); [ ${#METHODS[@]} -gt 0 ] || METHODS=(--methods dense,uniform,tp-gn,lapp); fi
if [ -z "$EPOCHS" ]; then
PROBE_SEEDS=$(seq -s, 0 $((JOBS - 1)))
PROBE_START=$SECONDS
timeout 150 "$PY" benchmarks/compare.py --out "$WORK/probe" --methods lapp --flops-targets 0.4 --seeds "$PROBE_SEEDS" \
    --epochs 2 --prune-epochs 1 "${COMMON[@]}" > "$WORK/probe.log" 2>&1
echo "probe exit $? in $((SECONDS - PROBE_START)) s"; pkill -f -- "$WORK/probe"; tail -3 "$WORK/probe.log"
PROBE_S=$((SECONDS - PROBE_START))
EPOCHS=$("$PY" - "$PROBE_S" "$(left)" "$JOBS" "$GPU_CHECK_S" <<'EOF'
import math, sys
probe_s, left_s, jobs, reserve_s = (float(v) for v in sys.argv[1:])
runs = 2 + 2 * 2 * 9                     # dense per seed + 9 methods x 2 targets x 2 seeds
per_epoch_s = probe_s / 2                # one epoch of `jobs` parallel runs, start-up and evaluation included
waves = runs / jobs * 1.3                # 30% for the tail (chains of 2, uneven lengths)
print(max(3, min(30, math.floor((left_s - reserve_s - 40) / (waves * per_epoch_s)))))
EOF
)
echo "epoch budget chosen: $EPOCHS"
fi
COMPARE=("$PY" benchmarks/compare.py --out "$WORK/compare" --flops-targets "$TARGETS" --seeds "$SEEDS" --epochs "$EPOCHS" "${COMMON[@]}" "${METHODS[@]}")
echo "command: ${COMPARE[*]}"
timeout $(( $(left) - GPU_CHECK_S - 20 )) "${COMPARE[@]}" > "$WORK/compare.log" 2>&1
echo "compare exit $?"; pkill -f -- "$WORK/compare"; sleep 2
"${COMPARE[@]}" --no-train > "$WORK/compare-summary.log" 2>&1   # the table of what finished, if the budget cut it
tail -30 "$WORK/compare.log"; tail -25 "$WORK/compare-summary.log"
fi

if [ "$DEVICE" = cuda ] && has_step gpucheck; then
    echo "== 3. gpu_check ($(left) s left)"
    timeout $(( $(left) - 25 )) "$PY" benchmarks/gpu_check.py --out "$WORK/gpu-check" --budget-s $(( $(left) - 60 )) \
        --train-subset 10000 > "$WORK/gpu-check.log" 2>&1
    echo "gpu_check exit $?"; tail -40 "$WORK/gpu-check.log"
    echo "== 4. latency-check torch-cuda ($(left) s left)"
    timeout 20 "$PY" -m lapp_edge latency-check --target gpu-torch-cuda-fp16 > "$WORK/latency-check.txt" 2>&1
    echo "latency-check exit $?"; tail -5 "$WORK/latency-check.txt"
fi

echo "== packing ($(left) s left)"
cd "$WORK"
{ find compare probe gpu-check -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.png' \) \
      ! -path '*/latency-work/*'
  find compare -type f -name slim_model.pt ! -path '*/pretrain/*'; } 2>/dev/null > files.txt
ls ./*.txt ./*.log ./*.yaml >> files.txt 2>/dev/null
tar czf - -T files.txt | split -b 15M - "$OUT/results.tgz.part-"
ls -la "$OUT"
