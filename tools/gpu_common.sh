# Shared by tools/gpu_check.sh and tools/gpu_study.sh (sourced, not run):
#   gpu_setup SCRIPT_NAME "$@"   parse OUT_DIR [--dry-run] into OUT (absolute), MODE, PY, ROOT
#   gpu_install                  install this working tree (pip --no-index --no-deps; torch with
#                                CUDA and the rest installed beforehand, or wheels in $WHEELS)
#                                and require a CUDA device; exits 1 with an error line if not
gpu_setup() {
  local name=$1; shift
  OUT=${1:?usage: tools/$name OUT_DIR [--dry-run]}
  MODE=${2:-gpu}
  PY=${PYTHON:-python3}
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  export PYTHONUNBUFFERED=1
}

gpu_install() {
  if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || exit 1; fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" \
    || { echo "error: pip install -e . failed (dependencies must be installed beforehand)"; exit 1; }
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "error: torch sees no CUDA device: install a CUDA build of torch"; exit 1; }
}
