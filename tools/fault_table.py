#!/usr/bin/env python
"""The fault table of issue 22 §1: every distributed stage × every injected fault, at 2 ranks.

    tools/fault_table.py [--stages train,estimate,sample,nll,fid] [--faults exception,write,...]
                         [--launcher torchrun|direct] [--work DIR]

For each (stage, fault) it runs the stage with the fault on rank 1 (rank 0 for the final
output write, the only rank that writes it), then reruns it unchanged and compares the
result with an uninterrupted run of the same stage. One JSON row per cell on stdout:

    {"stage", "fault", "launcher", "seconds_to_exit", "exit_status" (per rank), "error_shown",
     "peer_line", "rerun_equal"}

``seconds_to_exit``: from the fault (the hook's timestamp; bad data: the first rank's exit)
to the last rank's exit. ``exit_status``: per rank; under torchrun, from the agent's failure
summary: -15 is a rank the agent stopped (SIGTERM) once another had failed, "stopped" one
it does not list. ``error_shown``: the failing rank printed its error (its traceback or its
``error:`` line; hang: some rank printed the line naming it; kill -9: rank 0's line names
rank 1). ``peer_line``: the other rank's ``error:`` line. Faults (``ADPM_TEST_FAIL_RANK``,
:mod:`adpm_dist.io.collective`):
exception (``1:K``), write (train ``1:ckpt``, the jobs ``0:write``), bad-data (a shard only
rank 1 reads is truncated; sample reads no data: n/a), kill (``1:K:kill``, SIGKILL), hang
(``1:K:hang`` with ``ADPM_COLLECTIVE_TIMEOUT=5``).

Inputs come from the tests' helpers (tiny UNet, scikit-learn digits): run from a checkout.
``--launcher direct`` starts the ranks itself, as ``srun`` does (no agent ends a rank's
peers for it: the protocol alone must); ``torchrun`` is the real agent.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAULTS = ("exception", "write", "bad-data", "kill", "hang")
STAGES = ("train", "estimate", "sample", "nll", "fid")
HANG_TIMEOUT_S = "5"


# ---------------------------------------------------------------- launching 2 ranks


def _helpers():
    """tests/estimate_helpers.py (tiny model, digit shards, free ports), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_helpers", ROOT / "tests" / "estimate_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(extra: dict) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def launch(launcher: str, module: str, argv: list[str], extra: dict, work: Path, timeout: float = 240):
    """Run 2 ranks; (per-rank status, per-rank exit epoch or None, per-rank stderr, end epoch)."""
    free_port = _helpers().free_port
    port = free_port()
    logs = Path(tempfile.mkdtemp(dir=work, prefix="log-"))
    if launcher == "direct":
        procs = []
        for rank in range(2):
            env = _env(
                {
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    **extra,
                }
            )
            err = open(logs / f"{rank}.err", "w")
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", module, *argv],
                        env=env,
                        cwd=str(ROOT),
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    ),
                    err,
                )
            )
        ended: dict[int, float] = {}
        start = time.time()
        while len(ended) < 2 and time.time() - start < timeout:
            for rank, (p, _) in enumerate(procs):
                if rank not in ended and p.poll() is not None:
                    ended[rank] = time.time()
            time.sleep(0.02)
        for p, err in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            err.close()
        codes = [p.returncode if r in ended else "hung" for r, (p, _) in enumerate(procs)]
        errs = [(logs / f"{r}.err").read_text() for r in range(2)]
        return codes, [ended.get(r) for r in range(2)], errs, max(ended.values(), default=time.time())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--log-dir",
        str(logs),
        "--redirects",
        "2",
        "-m",
        module,
        *argv,
    ]
    try:
        proc = subprocess.run(
            cmd, env=_env(extra), cwd=str(ROOT), capture_output=True, text=True, timeout=timeout
        )
        agent, status = proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        agent, status = (exc.stderr or b"").decode(errors="replace"), "hung"
    end = time.time()
    errs = []
    for rank in range(2):
        files = glob.glob(str(logs / "**" / str(rank) / "stderr.log"), recursive=True)
        errs.append(Path(files[0]).read_text(errors="replace") if files else "")
    failed = {
        int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", agent)
    }
    codes = [failed.get(r, 0 if status == 0 else "stopped") for r in range(2)]
    return codes, [None, None], errs, end


# ---------------------------------------------------------------- the stages


def _train_setup(work: Path) -> dict:
    from adpm_dist.io import data, shards
    from adpm_dist.train.config import preset_path

    folder = work / "digits"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            "digits",
            str(folder),
            "--limit",
            "60",
            "--test-fraction",
            "0",
            "--shard-size",
            "20",
        ],
        check=True,
        capture_output=True,
    )

    def first(seed: int, rank: int) -> int:
        return int(next(data.shard_draws([str(i) for i in range(3)], seed, 0, rank, 0)))

    seed = next(s for s in range(100) if first(s, 0) != first(s, 1))

    def args(run: Path) -> list[str]:
        return [
            "--config",
            str(preset_path("tiny")),
            f"data.urls=[{folder}/train-*.tar]",
            f"train.run_dir={run}",
            f"train.seed={seed}",
            "train.total_steps=6",
            "train.ckpt_every=2",
            "data.batch_size=4",
            "data.batches_per_epoch=3",
            "data.shuffle_buffer=4",
            "train.progress=false",
        ]

    def corrupt() -> tuple[Path, bytes]:
        url = folder / f"train-{first(seed, 1):06d}.tar"
        good = url.read_bytes()
        samples = list(data._iter_tar_groups(str(url)))
        samples[1]["png"] = b"not a png"  # rank 1's 2nd sample of epoch 0 (buffer 4, batches of 2)
        shards.write_shard(str(url), samples)
        return url, good

    return {"module": "adpm_dist.train", "args": args, "corrupt": corrupt, "round": 3, "write": "1:ckpt"}


def _job_setup(stage: str, work: Path) -> dict:
    make_digit_shards, tiny_job_inputs = _helpers().make_digit_shards, _helpers().tiny_job_inputs

    if stage == "fid":
        folder = work / "fid"
        make_digit_shards(str(folder), limit=40, shard_size=4)

        def corrupt_samples() -> tuple[Path, bytes]:
            url = folder / "train-000001.tar"  # the second sample shard: rank 1's share
            good = url.read_bytes()
            url.write_bytes(good[:100])
            return url, good

        return {
            "module": "adpm_dist.evaluate",
            "round": 2,
            "write": "0:write",
            "corrupt": corrupt_samples,
            "args": lambda out: [
                "fid",
                "--reference",
                f"{folder}/test-{{000000..000001}}.tar",
                "--samples",
                f"{folder}/train-{{000000..000001}}.tar",
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--num-workers",
                "0",
                "--no-progress",
            ],
        }
    inputs = tiny_job_inputs(work / stage)
    model, data = inputs["model"], inputs["data"]
    last = Path(inputs["folder"]) / "test-000002.tar"  # ids 40..59: rank 1's share only

    def corrupt() -> tuple[Path, bytes]:
        good = last.read_bytes()
        last.write_bytes(good[:100])  # cut inside the first header: every sample lost
        return last, good

    argv = {
        "estimate": lambda out: [
            "--checkpoint",
            model,
            "--data",
            data,
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--no-progress",
            "--timesteps",
            "1-20",
            "--data-batch",
            "2",
            "--flush-every",
            "1",
            "--batch-size",
            "16",
        ],
        "sample": lambda out: [
            "--checkpoint",
            model,
            "--method",
            "ddim",
            "--steps",
            "3",
            "--num-samples",
            "6",
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ],
        "nll": lambda out: [
            "nll",
            "--checkpoint",
            model,
            "--data",
            data,
            "--steps",
            "3",
            "--methods",
            "ddpm-beta,ddpm-tilde",
            "--limit",
            "60",
            "--batch-size",
            "4",
            "--flush-every",
            "1",
            "--num-workers",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ],
    }[stage]
    module = {"estimate": "adpm_dist.estimate", "sample": "adpm_dist.sample", "nll": "adpm_dist.evaluate"}[
        stage
    ]
    return {
        "module": module,
        "args": argv,
        "round": 1,
        "write": "0:write",
        "corrupt": None if stage == "sample" else corrupt,
    }


def result_of(stage: str, out: Path):
    """What an uninterrupted run's result must equal (bit for bit)."""
    if stage == "train":
        import torch

        latest = json.loads((out / "latest.json").read_text())
        blob = (out / latest["deepspeed"] / "mp_rank_00_model_states.pt").read_bytes()
        module = torch.load(io.BytesIO(blob), weights_only=True)["module"]
        return latest["step"], {k: v.numpy().tobytes() for k, v in module.items()}
    if stage == "estimate":
        from adpm_dist.gamma import read_gamma

        g = read_gamma(str(out))
        return g.count.tobytes(), g.sum.tobytes(), g.sum_sq.tobytes()
    if stage == "sample":
        return {p.name: p.read_bytes() for p in sorted(out.glob("samples-*.tar"))}
    if stage == "nll":
        return {
            k: (v["bpd"], v["count"])
            for k, v in json.loads((out / "nll.json").read_text())["results"].items()
        }
    got = json.loads(out.read_text())
    return got["fid"], got["num_samples"]


# ---------------------------------------------------------------- one cell


def fault_env(spec: dict, fault: str) -> dict:
    k = spec["round"]
    return {
        "exception": {"ADPM_TEST_FAIL_RANK": f"1:{k}"},
        "write": {"ADPM_TEST_FAIL_RANK": spec["write"]},
        "kill": {"ADPM_TEST_FAIL_RANK": f"1:{k}:kill"},
        "bad-data": {},
        "hang": {"ADPM_TEST_FAIL_RANK": f"1:{k}:hang", "ADPM_COLLECTIVE_TIMEOUT": HANG_TIMEOUT_S},
    }[fault]


def cell(stage: str, fault: str, spec: dict, reference, launcher: str, work: Path) -> dict:
    row: dict = {"stage": stage, "fault": fault, "launcher": launcher}
    if fault == "bad-data" and spec["corrupt"] is None:
        return {**row, "not_applicable": "the stage reads no input data"}
    out = work / f"{stage}-{fault}" / ("out.json" if stage in ("estimate", "fid") else "out")
    out.parent.mkdir(parents=True, exist_ok=True)
    restore = spec["corrupt"]() if fault == "bad-data" else None
    try:
        codes, ended, errs, end = launch(
            launcher, spec["module"], spec["args"](out), fault_env(spec, fault), work
        )
    finally:
        if restore is not None:
            restore[0].write_bytes(restore[1])
    faulty = 0 if fault == "write" and spec["write"].startswith("0:") else 1
    marks = [float(m) for e in errs for m in re.findall(r"adpm-test: injected .* t=([0-9.]+)", e)]
    start = marks[0] if marks else min([t for t in ended if t is not None], default=end)
    peer = next((ln for ln in errs[1 - faulty].splitlines() if ln.startswith("error:")), None)
    shown = bool(re.search(r"Traceback|^error:", errs[faulty], re.M))
    if fault == "hang":  # the hung rank cannot speak: the line naming it, on any rank
        shown = any("rank 1 did not arrive" in e for e in errs)
    elif fault == "kill":  # the killed rank cannot speak: the survivor's line naming it
        shown = bool(re.search(r"^error: rank 1 (failed: it )?stopped responding", errs[0], re.M))
    row.update(
        seconds_to_exit=round(end - start, 2),
        exit_status=codes,
        error_shown=shown,
        peer_line=peer[:160] if peer else None,
    )
    rerun = launch(launcher, spec["module"], spec["args"](out), {}, work)
    row["rerun_status"] = rerun[0]
    try:
        row["rerun_equal"] = rerun[0] == [0, 0] and result_of(stage, out) == reference
    except (OSError, KeyError, ValueError) as exc:
        row["rerun_equal"], row["rerun_error"] = False, str(exc)[:160]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="train,estimate,sample,nll")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--launcher", choices=("torchrun", "direct"), default="torchrun")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-table-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for stage in args.stages.split(","):
            spec = _train_setup(work) if stage == "train" else _job_setup(stage, work)
            ref = work / f"{stage}-ref" / ("out.json" if stage in ("estimate", "fid") else "out")
            ref.parent.mkdir(parents=True, exist_ok=True)
            codes = launch(args.launcher, spec["module"], spec["args"](ref), {}, work)[0]
            if codes != [0, 0]:
                print(json.dumps({"stage": stage, "error": f"uninterrupted run failed: {codes}"}), flush=True)
                continue
            reference = result_of(stage, ref)
            for fault in args.faults.split(","):
                print(json.dumps(cell(stage, fault, spec, reference, args.launcher, work)), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
