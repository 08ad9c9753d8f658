#!/usr/bin/env bash
# One-GPU check (issues 16, 22): the whole GPU test tier (tests/test_gpu*.py: smoke runs and the
# numeric assertions), every benchmark that means something on a GPU (tools/bench_*.py) and what
# the numeric mode does to Γ and to the K = 10 analytic NELBO; ≤ 8 minutes on one GPU, no network.
#
#   tools/gpu_check.sh OUT_DIR            # on a machine with one CUDA GPU
#   tools/gpu_check.sh OUT_DIR --dry-run  # CPU: the same steps at toy sizes (figures meaningless)
#
# Installs the project from this working tree (pip --no-deps --no-index: torch with CUDA,
# deepspeed and the rest must already be installed, or carried as wheels in $WHEELS), then writes
# ONE summary, OUT_DIR/report.json (steps with exit status and wall time, every GPU test's outcome
# and recorded numbers, every benchmark's JSON, the numeric modes), report.md (the same, short)
# and each step's log. A step that fails is recorded as failed and the script goes on; the exit
# status is 1 if any failed. The whole run has one budget (BUDGET_S, default 450 s): each step's
# time limit is cut to what is left, a step with under 10 s left is recorded as skipped (rc 125).
# The dry run's limits and budget are 4× (a shared CPU is slower than any GPU run, not bounded).
# GPU_CHECK_ONLY="gpu_tier bench_modes" runs only the named steps (the CPU test uses it).
# Not run: bench_data (S3 against local disk: CPU and network bound, no GPU path).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
gpu_setup gpu_check.sh "$@"
cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/steps.tsv"
SCALE=1; [ "$MODE" = --dry-run ] && SCALE=4
BUDGET_S=${BUDGET_S:-$((450 * SCALE))}
ONLY=${GPU_CHECK_ONLY:-}

step() {  # step NAME SECONDS CMD...: run within the time left, log, record status and wall time
  local name=$1 limit=$(($2 * SCALE)); shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%s\t125\t0\n' "$name" >>"$OUT/steps.tsv"; echo "== $name skipped: budget spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

if [ "$MODE" = --dry-run ]; then
  echo "dry run on CPU: toy sizes; no figure from this run is a GPU measurement"
  B_TRAIN=(--preset tiny --steps 3 --rounds 1 --warmup 1); B_EST=(--timesteps 4 --repeats 1 --samples 40)
  B_SAMPLE=(--steps 2 --batch-size 8 --batches 1 --repeats 1 --skip-rss); B_DIFF=(--steps 2 --repeats 1 --size 8)
  B_MODES=(--samples 40); B_TRAJ=(--steps 10,100 --repeats 1); B_LAUNCH=(--timesteps 4 --repeats 1 --samples 40 --skip-all-cores)
  DEVICE=cpu
else
  gpu_install
  B_TRAIN=(--preset mnist --steps 30 --rounds 3); B_EST=(--model mnist --timesteps 40)
  B_SAMPLE=(--model mnist --skip-rss); B_DIFF=(--size 32); B_MODES=(); B_TRAJ=(--repeats 2)
  B_LAUNCH=(--timesteps 32 --repeats 1 --skip-all-cores)
  DEVICE=cuda
fi

# bench_train reads real shards (digits, resized to the preset's 28 px on the GPU run)
RES=(); [ "$MODE" = --dry-run ] || RES=(--resolution 28 --fit resize)
if [ -z "$ONLY" ] || [[ " $ONLY " == *" bench_train "* ]]; then
  "$PY" tools/make_shards.py digits "$OUT/digits" --shard-size 400 "${RES[@]}" >"$OUT/make_shards.log" 2>&1
fi
B_TRAIN+=(--data "$OUT/digits/train-*.tar")

# The tier (skips with its reason without CUDA); junit keeps each test's outcome and numbers.
step gpu_tier 220 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider --junitxml="$OUT/gpu_tier.xml" \
  -o junit_family=xunit1 tests/test_gpu.py tests/test_gpu_numeric.py
step bench_train 50 "$PY" tools/bench_train.py "${B_TRAIN[@]}"
step bench_estimate 40 "$PY" tools/bench_estimate.py "${B_EST[@]}"
step bench_sample 40 "$PY" tools/bench_sample.py "${B_SAMPLE[@]}"
step bench_diffusers 30 "$PY" tools/bench_diffusers.py "${B_DIFF[@]}" --device "$DEVICE"
step numeric_modes 60 "$PY" tools/bench_modes.py "$OUT/numeric_modes.json" --device "$DEVICE" "${B_MODES[@]}"
step bench_trajectory 15 "$PY" tools/bench_trajectory.py "${B_TRAJ[@]}"
# two ranks on the one GPU: NCCL refuses a shared device, so the launcher's ranks use gloo there
step bench_launch 40 env ADPM_DIST_BACKEND=gloo "$PY" tools/bench_launch.py "${B_LAUNCH[@]}"
"$PY" - "$OUT" "$MODE" <<'PYEOF'
import json, pathlib, subprocess, sys, time
import xml.etree.ElementTree as ET
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
steps = [dict(zip(("step", "rc", "wall_s"), l.split("\t"))) for l in (out / "steps.tsv").read_text().splitlines()]
for s in steps:
    s["rc"], s["wall_s"] = int(s["rc"]), int(s["wall_s"])
def last_json(name):
    log = out / f"{name}.log"
    if not log.exists():
        return None
    try:
        return json.loads(log.read_text())
    except ValueError:
        pass
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None
def tier():
    """Every GPU test: outcome, seconds, the skip/failure message, the numbers it recorded."""
    path = out / "gpu_tier.xml"
    if not path.exists():
        return None
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message, "recorded": props})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() or None
except OSError:
    gpu = None
modes = out / "numeric_modes.json"
report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "dry_run": mode == "--dry-run",
          "total_wall_s": sum(s["wall_s"] for s in steps), "steps": steps, "gpu_tier": tier(),
          "benchmarks": {s["step"]: last_json(s["step"]) for s in steps if s["step"].startswith("bench_")},
          "numeric_modes": json.loads(modes.read_text()) if modes.exists() else None}
(out / "report.json").write_text(json.dumps(report, indent=1))
md = [f"# GPU check {report['date']} on {gpu or 'no GPU'}" + (" (DRY RUN on CPU: not GPU figures)"
      if report["dry_run"] else ""), "", "| step | exit | wall s |", "|---|---|---|"]
md += [f"| {s['step']} | {s['rc']} | {s['wall_s']} |" for s in steps]
if report["gpu_tier"]:
    md += ["", f"## GPU tier: {report['gpu_tier']['counts']}", ""]
    md += [f"- {t['outcome']}: {t['test']} ({t['seconds']:.1f} s)" + (f" {t['recorded']}" if t["recorded"] else "")
           + (f" — {t['message'][:200]}" if t["outcome"] in ("failed", "error") else "")
           for t in report["gpu_tier"]["tests"]]
md += ["", "## Benchmarks", ""] + [f"- {k}: `{json.dumps(v)}`" for k, v in report["benchmarks"].items()]
if report["numeric_modes"]:
    md += ["", "## Numeric modes (max |ΔΓ| and K = 10 analytic NELBO vs fp64; time vs fp32)", "",
           "| mode | max abs ΔΓ | max abs Δ(1-Γ)/(1-Γ) | NELBO bpd | Δ bpd | Γ job time | NLL time |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {m} | {r['gamma_max_abs_diff']:.3g} | {r['one_minus_gamma_max_rel_diff']:.3g} | "
           f"{r['nelbo_bpd']:.5f} | {r['nelbo_bpd_diff']:.3g} | {r['gamma_job_time_ratio_vs_fp32']}x | "
           f"{r['nll_time_ratio_vs_fp32']}x |" for m, r in report["numeric_modes"]["modes"].items()]
(out / "report.md").write_text("\n".join(md) + "\n")
print((out / "report.md").read_text())
PYEOF
awk -F'\t' '$2 != 0 {bad=1} END {exit bad}' "$OUT/steps.tsv"
