"""A training run's directory (a local path or ``s3://``): layout, ``latest.json`` and metrics.

DeepSpeed can only write to a local folder, so a remote run keeps a local
``stage`` folder per node that checkpoints are written to and uploaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from adpm_dist.io import storage

LATEST = "latest.json"
EMA_FILE = "ema.safetensors"
METRICS_DIR = "metrics"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunDir:
    """Where a run keeps its state; DeepSpeed writes only to the local ``stage`` folder."""

    url: str
    stage: str  # local folder holding ckpt/<tag>/ as DeepSpeed wrote or will read it

    @classmethod
    def create(cls, url: str, stage_dir: str = "", node_rank: int = 0) -> RunDir:
        if not storage.is_remote(url):
            return cls(url=url, stage=storage.local_path(url))
        base = stage_dir or os.path.join(tempfile.gettempdir(), "adpm_stage")
        # One folder per node: nodes sharing a host or a file system never race on it.
        return cls(url=url, stage=os.path.join(base, _digest(url), f"node{node_rank}"))

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.url)

    def join(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def stage_ckpt(self) -> str:
        return os.path.join(self.stage, "ckpt")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(run: RunDir) -> dict[str, Any] | None:
    url = run.join(LATEST)
    if not storage.exists(url):
        return None
    try:
        latest = json.loads(storage.read_text(url))
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{url}: invalid JSON ({exc})") from None
    for key in ("step", "ema", "deepspeed", "schedule", "model"):
        if key not in latest:
            raise RuntimeError(f"{url}: missing key '{key}'")
    return latest


def _part_name(start_step: int) -> str:
    return f"{start_step:08d}.jsonl"


def metrics_parts(run_url: str) -> list[str]:
    """URLs of the metrics part files in step order (empty when none were written)."""
    root = storage.join(run_url, METRICS_DIR)
    if not storage.exists(root):
        return []
    names = [u for u in storage.listdir(root) if _part_start(u) is not None]
    return sorted(names, key=lambda u: _part_start(u) or 0)


def _part_start(url: str) -> int | None:
    stem, dot, ext = storage.basename(url).partition(".")
    return int(stem) if dot and ext == "jsonl" and stem.isdigit() else None


def read_metrics(run_url: str) -> list[dict[str, Any]]:
    """Every logged record of a run, in step order: the part files concatenated."""
    records = []
    for url in metrics_parts(run_url):
        for line in storage.read_text(url).splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


class Metrics:
    """The run's metrics on rank 0, append-only: one part file per checkpoint segment.

    ``metrics/NNNNNNNN.jsonl`` holds the records of the steps after checkpoint NNNNNNNN
    up to the next one. A local run appends each record to the open part at once; an
    s3:// run writes the part once, at the checkpoint that ends its segment. So a
    checkpoint writes only its own segment's lines, however long the run is. Resuming
    from step S deletes the parts that start at or after S (their steps run again);
    earlier parts end at or before S and stay as they are.
    """

    def __init__(self, run: RunDir, resume_step: int, enabled: bool) -> None:
        self.run = run
        self.root = run.join(METRICS_DIR)
        self.enabled = enabled
        self.lines: list[str] = []
        self.start = resume_step
        if not enabled:
            return
        for url in metrics_parts(run.url):
            if (_part_start(url) or 0) >= resume_step:
                storage.remove(url)
        storage.makedirs(self.root)

    @property
    def url(self) -> str:
        """The part file of the segment being logged."""
        return storage.join(self.root, _part_name(self.start))

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, allow_nan=False)
        self.lines.append(line)
        if not self.run.remote:
            with open(storage.local_path(self.url), "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def flush(self, step: int) -> None:
        """End the segment at checkpoint ``step``; the next records go to a new part."""
        if not self.enabled:
            return
        if self.run.remote and self.lines:
            storage.write_text(self.url, "".join(line + "\n" for line in self.lines))
        self.lines = []
        self.start = step
