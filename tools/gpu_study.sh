#!/usr/bin/env bash
# The reproduction study on one GPU (issue 16): train the MNIST study model far longer than a
# CPU allows, estimate Γ and the model-error moments on all 1,000 timesteps, the NLL table at
# K = 10 … 1000 (even and each method's optimal trajectory) and FID at K = 10/25/50 for every
# method and both DDIM directions. ≤ 9 minutes on one large GPU, no network.
#
#   tools/gpu_study.sh OUT_DIR            # on a machine with one CUDA GPU
#   tools/gpu_study.sh OUT_DIR --dry-run  # CPU: the same steps at toy sizes (figures meaningless)
#
# It is tools/reproduce_mnist.sh --profile study with GPU-sized knobs (each can be overridden
# from the environment, as there), under one wall-clock limit (BUDGET_S, default 520 s): the
# stages are resumable, so whatever finished is reported and a rerun with the same OUT_DIR
# continues. Installs the project from this working tree like tools/gpu_check.sh (pip --no-deps
# --no-index: torch with CUDA and the rest installed beforehand, or carried as wheels in
# $WHEELS). Writes, small enough to bring back from a device machine:
#   OUT_DIR/RESULTS.md       the tables (tools/results_table.py), the same as the CPU study's
#   OUT_DIR/ema.safetensors  the trained EMA weights (load with --checkpoint FILE)
#   OUT_DIR/gamma.json       Γ and the moments;  OUT_DIR/study.log  everything the run printed
#   OUT_DIR/timings.jsonl    wall time per stage
# The exit status is 0 only if every stage finished inside the budget.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
gpu_setup gpu_study.sh "$@"
WORK="$OUT/work"   # shards, run dir, samples: left behind, not brought back
export PYTHONUNBUFFERED=1 PYTHON="$PY"

if [ "$MODE" = --dry-run ]; then
  echo "dry run on CPU: toy sizes; no figure from this run is a GPU measurement"
  export LIMIT=${LIMIT:-300} TRAIN_STEPS=${TRAIN_STEPS:-4} BATCH=${BATCH:-8} WARMUP=${WARMUP:-1} \
    GAMMA_SAMPLES=${GAMMA_SAMPLES:-2} \
    NLL_STEPS=${NLL_STEPS:-2,3} NLL_LIMIT=${NLL_LIMIT:-4} NLL_BATCH=${NLL_BATCH:-4} \
    FID_STEPS=${FID_STEPS:-2} FID_SAMPLES=${FID_SAMPLES:-8} NUM_SAMPLES=${NUM_SAMPLES:-4} \
    SAMPLE_STEPS=${SAMPLE_STEPS:-2}
  BUDGET_S=${BUDGET_S:-900}
else
  gpu_install
  # The study model at the paper's CIFAR-10 recipe (batch 128, lr 2e-4), as long as the budget
  # allows; Γ from 100 images per timestep; NLL on the whole test split.
  export TRAIN_STEPS=${TRAIN_STEPS:-12000} BATCH=${BATCH:-128} LR=${LR:-2e-4} WARMUP=${WARMUP:-500} \
    GAMMA_SAMPLES=${GAMMA_SAMPLES:-100} NLL_BATCH=${NLL_BATCH:-500} FID_STEPS=${FID_STEPS:-10,25,50} \
    FID_SAMPLES=${FID_SAMPLES:-1000}
  BUDGET_S=${BUDGET_S:-520}
fi
export NLL_STEPS=${NLL_STEPS:-10,25,50,100,200,1000} NLL_TRAJECTORIES=${NLL_TRAJECTORIES:-even,optimal}
export FID_METHODS=${FID_METHODS:-ddpm-tilde,ddpm-beta,analytic-ddpm,residual-ddpm,ddim,ddim@network,analytic-ddim,analytic-ddim@network,residual-ddim,residual-ddim@network}

echo "gpu_study: budget ${BUDGET_S}s, $TRAIN_STEPS training steps, work folder $WORK"
timeout "$BUDGET_S" bash "$ROOT/tools/reproduce_mnist.sh" --profile study --out "$WORK" 2>&1 | tee "$OUT/study.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_study: stopped at the ${BUDGET_S}s budget; rerun with the same OUT_DIR to continue" \
  | tee -a "$OUT/study.log"

# The report of what finished (a stage that did not is listed as missing, never filled in).
"$PY" "$ROOT/tools/results_table.py" "$WORK" --write "$OUT/RESULTS.md" >/dev/null 2>>"$OUT/study.log"
for f in run/ema.safetensors gamma.json timings.jsonl; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(basename "$f")"
done
{ echo; echo "_gpu_study on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU')," \
    "$(date -u +%Y-%m-%d), exit status ${rc}_"; } >>"$OUT/RESULTS.md"
cat "$OUT/RESULTS.md"
exit "$rc"
