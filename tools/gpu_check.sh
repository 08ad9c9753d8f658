#!/usr/bin/env bash
# One-GPU check (issue 16): the GPU test tier, the benchmarks on the GPU and what the numeric
# mode does to Γ and to the K = 10 analytic NELBO; ≤ 8 minutes on one GPU, no network.
#
#   tools/gpu_check.sh OUT_DIR            # on a machine with one CUDA GPU
#   tools/gpu_check.sh OUT_DIR --dry-run  # CPU: the same steps at toy sizes (figures meaningless)
#
# Installs the project from this working tree (pip --no-deps --no-index: torch with CUDA,
# deepspeed and the rest must already be installed, or carried as wheels in $WHEELS), then writes
# OUT_DIR/report.json and OUT_DIR/report.md (plus each step's log). A step that fails is recorded
# as failed in the report and the script goes on; the exit status is 1 if any failed.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
gpu_setup gpu_check.sh "$@"
cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/steps.tsv"

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record status and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

if [ "$MODE" = --dry-run ]; then
  echo "dry run on CPU: toy sizes; no figure from this run is a GPU measurement"
  B_TRAIN=(--steps 3 --rounds 1 --warmup 1); B_EST=(--timesteps 4 --repeats 1 --samples 40)
  B_SAMPLE=(--steps 2 --batch-size 8 --batches 1 --repeats 1 --skip-rss); B_DIFF=(--steps 2 --repeats 1 --size 8)
  DEVICE=cpu
else
  gpu_install
  B_TRAIN=(--preset mnist --steps 30 --rounds 3); B_EST=(--model mnist --timesteps 40)
  B_SAMPLE=(--model mnist --skip-rss); B_DIFF=(--size 32)
  DEVICE=cuda
fi

# bench_train reads real shards (digits, resized to the preset's 28 px on the GPU run)
RES=(); [ "$MODE" = --dry-run ] || RES=(--resolution 28 --fit resize)
"$PY" tools/make_shards.py digits "$OUT/digits" --shard-size 400 "${RES[@]}" >"$OUT/make_shards.log" 2>&1
B_TRAIN+=(--data "$OUT/digits/train-*.tar")

if [ "$MODE" = --dry-run ]; then  # the tier skips without CUDA: show that it collects and skips
  step gpu_tier 120 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py
else
  step gpu_tier 200 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py
fi
step bench_train 60 "$PY" tools/bench_train.py "${B_TRAIN[@]}"
step bench_estimate 60 "$PY" tools/bench_estimate.py "${B_EST[@]}"
step bench_sample 60 "$PY" tools/bench_sample.py "${B_SAMPLE[@]}"
step bench_diffusers 40 "$PY" tools/bench_diffusers.py "${B_DIFF[@]}" --device "$DEVICE"
step numeric_modes 90 "$PY" tools/bench_modes.py "$OUT/numeric_modes.json" --device "$DEVICE"
"$PY" - "$OUT" "$MODE" <<'PYEOF'
import json, pathlib, subprocess, sys, time
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
steps = [dict(zip(("step", "rc", "wall_s"), l.split("\t"))) for l in (out / "steps.tsv").read_text().splitlines()]
def last_json(name):
    try:
        return json.loads((out / f"{name}.log").read_text())
    except ValueError:
        pass
    for line in reversed((out / f"{name}.log").read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() or None
except OSError:
    gpu = None
modes = out / "numeric_modes.json"
report = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "dry_run": mode == "--dry-run",
          "steps": steps, "benchmarks": {s: last_json(s) for s in ("bench_train", "bench_estimate", "bench_sample",
                                                                  "bench_diffusers")},
          "numeric_modes": json.loads(modes.read_text()) if modes.exists() else None}
(out / "report.json").write_text(json.dumps(report, indent=1))
md = [f"# GPU check {report['date']} on {gpu or 'no GPU'}" + (" (DRY RUN on CPU: not GPU figures)"
      if report["dry_run"] else ""), "", "| step | exit | wall s |", "|---|---|---|"]
md += [f"| {s['step']} | {s['rc']} | {s['wall_s']} |" for s in steps]
md += ["", "## Benchmarks", ""] + [f"- {k}: `{json.dumps(v)}`" for k, v in report["benchmarks"].items()]
if report["numeric_modes"]:
    md += ["", "## Numeric modes (max |ΔΓ| and K = 10 analytic NELBO, vs fp64)", "",
           "| mode | max abs ΔΓ | max abs Δ(1-Γ)/(1-Γ) | NELBO bpd | Δ bpd |", "|---|---|---|---|---|"]
    md += [f"| {m} | {r['gamma_max_abs_diff']:.3g} | {r['one_minus_gamma_max_rel_diff']:.3g} | "
           f"{r['nelbo_bpd']:.5f} | {r['nelbo_bpd_diff']:.3g} |" for m, r in report["numeric_modes"]["modes"].items()]
(out / "report.md").write_text("\n".join(md) + "\n")
print((out / "report.md").read_text())
PYEOF
awk -F'\t' '$2 != 0 {bad=1} END {exit bad}' "$OUT/steps.tsv"
