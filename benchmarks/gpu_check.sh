#!/usr/bin/env bash
# One short speed check for a GPU machine; every figure goes to one file.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--mct-python PY] [OUT_FILE]
#
# Runs, for resnet20_cifar10 and efficientnet_lite0 (skipped with a note when the registry has no such model):
#   1. generation, exact and fast (plus bare forward+backward baselines, and MCT when --mct-python is given):
#      benchmarks/generation.py --timing-only --device cuda;
#   2. calibration (pot W8A8, MSE) and quantized inference, float vs reference fake-quant vs lean forward:
#      benchmarks/quantize.py --device cuda.
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
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
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

echo -e "\nall figures in $OUT" | tee -a "$OUT"
