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
METRICS_FILE = "metrics.jsonl"


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


class Metrics:
    """metrics.jsonl on rank 0: appended locally at once; for s3:// rewritten at checkpoints."""

    def __init__(self, run: RunDir, resume_step: int, enabled: bool) -> None:
        self.run = run
        self.url = run.join(METRICS_FILE)
        self.enabled = enabled
        self.lines: list[str] = []
        if not enabled:
            return
        if storage.exists(self.url):
            kept = []
            for line in storage.read_text(self.url).splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: drop it, the run re-logs that step
            self.lines = kept
        # Lines past the checkpoint we resume from will be logged again: drop them now.
        self._rewrite()

    def _rewrite(self) -> None:
        text = "".join(line + "\n" for line in self.lines)
        storage.write_text(self.url, text)

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, allow_nan=False)
        self.lines.append(line)
        if not self.run.remote:
            with open(storage.local_path(self.url), "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def flush(self) -> None:
        if self.enabled and self.run.remote:
            self._rewrite()
