#!/usr/bin/env bash
# One entry point, two commands (see README.md):
#   ./run.sh          install everything from scratch (idempotent) and run the main job: `dvc repro` on params.yaml
#   ./run.sh test     install the same way and run the test suite (what CI runs)
# Extra arguments after `test` go to pytest (e.g. ./run.sh test -k report); after `repro` to dvc repro.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
MODE="${1:-repro}"
[ $# -gt 0 ] && shift

PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"

log() { printf '\n== %s\n' "$*" >&2; }

# ------------------------------------------------------------------------------------------- install
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# torch/torchvision FIRST and pinned: these versions install from local wheels; any other version downloads GBs.
log "installing torch, torchvision, then dgh[dev] (pinned, see pyproject.toml)"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"

# ------------------------------------------------------------------------------------- environment
export PATH="$VENV/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_VERBOSE=false
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# ultralytics probes for Arial.ttf on every val and downloads it when missing: ship a local font instead.
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$ROOT/.cache/ultralytics}"
mkdir -p "$YOLO_CONFIG_DIR"
if [ ! -f "$YOLO_CONFIG_DIR/Arial.ttf" ]; then
  FONT="$("$VENV/bin/python" -c 'import matplotlib, pathlib; print(pathlib.Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf")')"
  cp "$FONT" "$YOLO_CONFIG_DIR/Arial.ttf"
  cp "$FONT" "$YOLO_CONFIG_DIR/Arial.Unicode.ttf"
fi
# `dvc exp run` commits experiments: give this clone a git identity if it has none.
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config user.email >/dev/null 2>&1 || git config user.email "dgh@localhost"
  git config user.name >/dev/null 2>&1 || git config user.name "dgh"
fi

case "$MODE" in
  repro)
    log "checking params.yaml and the data/weights it points at"
    dgh check
    log "dvc repro (stages/ outputs, MLflow runs in mlflow.db, tables in reports/)"
    start=$(date +%s)
    dvc repro "$@"
    log "done in $(( $(date +%s) - start )) s; reports/results.md:"
    cat reports/results.md
    echo
    echo "MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
    ;;
  test)
    log "pytest"
    python -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh [repro [dvc repro args] | test [pytest args]]" >&2
    exit 2
    ;;
esac
