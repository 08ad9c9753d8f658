"""DataLoader workers for the shard streams (:mod:`adpm_dist.io.data`).

- ``prefetch_factor`` 4: each worker keeps up to 4 batches (the items are whole batches) ready.
- ``persistent_workers`` for the training stream: the workers outlive an epoch, so a new
  epoch does not start new processes (iterate the same loader again).
- ``pin_memory`` when CUDA is available: the trainer's ``.to(device, non_blocking=True)``
  then copies asynchronously.
- **Start method.** Workers start by ``forkserver`` instead of ``fork`` whenever the shards
  are remote or fsspec's event-loop thread (s3fs/aiobotocore's loop) already runs in this
  process: a forked child inherits that loop's state without the thread that runs it, and
  two-worker S3 reads crashed or hung that way. The forkserver imports
  :mod:`adpm_dist.io.data` once (which registers the ``s3://`` opener) and forks the
  workers from itself, a process with no such thread; each worker then adopts this
  process's S3 settings (:func:`adpm_dist.io.backend.settings_snapshot`: the AWS variables,
  ``storage.configure`` overrides and retry policy), which it would not inherit otherwise.
"""

from __future__ import annotations

import functools
import multiprocessing
import threading
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, IterableDataset

from adpm_dist.io import backend


def loader(dataset: IterableDataset, num_workers: int, *, remote: bool = False,
            persistent: bool = False) -> Iterable:
    """The dataset's items through ``num_workers`` worker processes (0: in this process);
    ``remote``: the dataset reads remote shards; ``persistent``: keep the workers across epochs."""
    if num_workers <= 0:
        return iter(dataset)
    safe = _fork_unsafe(remote)
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4,
        persistent_workers=persistent, pin_memory=torch.cuda.is_available(),
        multiprocessing_context=_forkserver() if safe else None,
        worker_init_fn=functools.partial(_init_worker, backend.settings_snapshot()) if safe else None,
    )


def _fork_unsafe(remote: bool) -> bool:
    """Remote shards, or fsspec's event-loop thread (aiobotocore's loop) alive in this process:
    a forked child would inherit that loop's state without its thread."""
    return remote or any(t.name == "fsspecIO" for t in threading.enumerate())


def _forkserver():
    ctx = multiprocessing.get_context("forkserver")
    # The server imports this module once (the s3:// opener, torch); workers fork from it.
    ctx.set_forkserver_preload(["adpm_dist.io.data"])
    return ctx


def _init_worker(settings: dict, worker_id: int) -> None:
    """A forkserver worker's S3 settings: the main process's (environment and overrides)."""
    del worker_id
    backend.apply_settings(settings)
