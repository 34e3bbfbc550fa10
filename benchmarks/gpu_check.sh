#!/usr/bin/env bash
# One short speed check for a GPU machine; every figure goes to one file.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--mct-python PY] [OUT_FILE]
#
# Runs, for resnet20_cifar10 and efficientnet_lite0 (skipped with a note when the registry has no such model):
#   1. generation, exact and fast (plus bare forward+backward baselines, and MCT when --mct-python is given):
#      benchmarks/generation.py --timing-only --device cuda;
#   2. calibration (pot W8A8, MSE) and quantized inference, float vs reference fake-quant vs lean forward:
#      benchmarks/quantize.py --device cuda;
#   3. distributed generation (NCCL, one process per GPU, all GPUs present) against one process (resnet20_cifar10).
# --dry-run: the same commands on the CPU with tiny sizes (checks the code paths and the script, no GPU needed).
# Weights: the real ResNet-20 file from $DGH_ASSETS; efficientnet_lite0 with random weights (speed only).
# Run from the repository root with the project's environment active (python can import dgh).
set -euo pipefail

DRY=0
MCT_PY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --mct-python) MCT_PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) OUT="$1"; shift ;;
  esac
done
OUT="${OUT:-gpu_check_$(date -u +%Y%m%dT%H%M%SZ).txt}"
ASSETS="${DGH_ASSETS:-../shared/assets}"
PY="${PYTHON:-python}"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; N=8; ITERS=2; BS=4; REPEATS=1; CALIB=8; INNER=1; THREADS=1; QEXTRA="--no-compile --batch 4"
else
  DEVICE=cuda; N=256; ITERS=50; BS=64; REPEATS=3; CALIB=256; INNER=10; THREADS=0; QEXTRA=""
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU machine')"
fi

have_model() {
  "$PY" - "$1" <<'EOF'
import sys
from dgh.models.registry import load_model
try:
    load_model(sys.argv[1], "random")
except Exception as exc:  # noqa: BLE001 - any failure means: skip this model
    print(f"cannot build: {exc}".splitlines()[0][:160])
    sys.exit(1)
EOF
}

{
  echo "# dgh GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), dry-run=$DRY, device=$DEVICE"
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' || true
} | tee "$OUT"

THREADS_ARG=$([ "$THREADS" = 0 ] && nproc || echo "$THREADS")
MCT_ARGS=()
[ -n "$MCT_PY" ] && MCT_ARGS=(--mct-python "$MCT_PY") || MCT_ARGS=(--skip-mct)

for MODEL in resnet20_cifar10 efficientnet_lite0; do
  if ! note=$(have_model "$MODEL"); then
    echo -e "\n## $MODEL: skipped ($note)" | tee -a "$OUT"
    continue
  fi
  if [ "$MODEL" = resnet20_cifar10 ]; then WEIGHTS="$ASSETS/cifar10/models/resnet20-12fca82f.th"; else WEIGHTS=random; fi
  echo -e "\n## generation: $MODEL, N=$N, iterations=$ITERS, batch=$BS, device=$DEVICE" | tee -a "$OUT"
  "${MCT_PY:-$PY}" benchmarks/generation.py --timing-only --device "$DEVICE" --model "$MODEL" --weights "$WEIGHTS" \
    --n-images "$N" --iters "$ITERS" --batch-size "$BS" --repeats "$REPEATS" --threads "$THREADS_ARG" \
    "${MCT_ARGS[@]}" --plan "bare fwd+bwd" "bare fwd+bwd bf16+channels-last" "dgh exact" \
    "dgh fast (bf16 + channels-last)" "dgh fast + lazy refresh" 2>&1 | grep -v -i warn | tee -a "$OUT"
done

echo -e "\n## calibration and quantized inference, device=$DEVICE" | tee -a "$OUT"
MODELS=(resnet20_cifar10)
have_model efficientnet_lite0 >/dev/null && MODELS+=(efficientnet_lite0)
# shellcheck disable=SC2086
"$PY" benchmarks/quantize.py --device "$DEVICE" --models "${MODELS[@]}" --n-calib "$CALIB" --repeats "$REPEATS" \
  --inner "$INNER" --threads "$THREADS_ARG" $QEXTRA 2>&1 | grep -v -i warn | tee -a "$OUT"

# 3. distributed generation (issue 14): NCCL, one process per GPU, against one process; same images promised on CPU
#    bit-for-bit (gloo; tests/test_distributed.py), here reported as the largest pixel difference.
if [ "$DRY" = 1 ]; then NPROC=2; DN=8; DBS=2; DITERS=2; else NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())"); DN=256; DBS=32; DITERS=50; fi
echo -e "\n## distributed generation: resnet20_cifar10, N=$DN, batch=$DBS, iterations=$DITERS, $NPROC process(es) vs 1, device=$DEVICE ($([ "$DEVICE" = cuda ] && echo NCCL || echo gloo))" | tee -a "$OUT"
if [ "$NPROC" -lt 2 ]; then
  echo "only $NPROC GPU: the multi-process path needs 2 or more (skipped)" | tee -a "$OUT"
else
  DTMP=$(mktemp -d)
  for K in 1 "$NPROC"; do
    "$PY" -m dgh.cli --threads 1 generate --model resnet20_cifar10 --weights "$ASSETS/cifar10/models/resnet20-12fca82f.th" \
      --out "$DTMP/k$K" --n-images "$DN" --batch-size "$DBS" --iterations "$DITERS" --processes "$K" \
      --set schedule=synchronous --set checkpoint_every=0 --device "$DEVICE" --no-progress 2>&1 | grep -v -i warn | tail -2 | tee -a "$OUT"
  done
  "$PY" - "$DTMP/k1" "$DTMP/k$NPROC" <<'EOF' | tee -a "$OUT"
import json, sys
from dgh.io import load_images
a, b = (load_images(f"{d}/images.pt") for d in sys.argv[1:3])
ma, mb = (json.load(open(f"{d}/meta.json")) for d in sys.argv[1:3])
ta, tb = ma["wall_time_s"], mb["wall_time_s"]
print(f"engine wall time: 1 process {ta:.2f} s, {mb['settings']['processes']} processes {tb:.2f} s, "
      f"speed-up {ta / tb:.2f}x; max |image difference| {float((a - b).abs().max()):.3g}")
EOF
  rm -rf "$DTMP"
fi

echo -e "\nall figures in $OUT" | tee -a "$OUT"
