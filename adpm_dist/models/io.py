"""Model checkpoints as safetensors: weights, architecture config and metadata. Never pickle.

A checkpoint is one safetensors blob whose header metadata holds

* ``adpm_dist.format``: ``"adpm-model/1"``;
* ``adpm_dist.train.config``: ``model.config`` as JSON (what ``build_model`` needs);
* ``adpm_dist.metadata``: the caller's extra metadata as one JSON object.

Half-precision tensors are stored as float32 (float64 stays float64), so a
checkpoint of a mixed-precision run loads into a fresh fp32 model anywhere.
The bytes functions are the core; ``save_model``/``load_model`` are thin
local-file wrappers (remote storage goes through ``adpm_dist.io.storage`` with
the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adpm_dist.models.registry import build_model

FORMAT = "adpm-model/1"
KEY_FORMAT = "adpm_dist.format"
KEY_CONFIG = "adpm_dist.config"
KEY_METADATA = "adpm_dist.metadata"


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP/DeepSpeed (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _config_of(model: nn.Module) -> dict[str, Any]:
    config = getattr(unwrap(model), "config", None)
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{type(model).__name__} has no model.config dict with a 'type'")
    return config


def _canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN (not valid JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def state_dict_fp32(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the state dict, half precision upcast to float32.

    fp16/bf16 (mixed-precision training) become float32 exactly; float64
    tensors (e.g. the oracle's schedule buffers) stay float64, since narrowing
    them would lose what the design keeps in double precision. Copies (not
    views) so tensors that share storage can be saved by safetensors and later
    training steps cannot change what was captured.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap(model).state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
            t = t.to(torch.float32)
        out[name] = t.contiguous().clone()
    return out


def model_to_bytes(model: nn.Module, metadata: dict[str, Any] | None = None) -> bytes:
    """Serialise weights (half precision as float32), ``model.config`` and ``metadata``."""
    header = {
        KEY_FORMAT: FORMAT,
        KEY_CONFIG: _canonical_json(_config_of(model)),
        KEY_METADATA: _canonical_json(metadata or {}),
    }
    return st_save(state_dict_fp32(model), metadata=header)


def _read_header_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, parsed independently of the tensors."""
    if len(data) < 8:
        raise ValueError(f"{source}: not a safetensors file ({len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(f"{source}: safetensors header claims {size} bytes, file has "
                         f"{len(data) - 8} (truncated or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: unreadable safetensors header: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: safetensors header has no metadata; "
                         "not an adpm_dist model checkpoint")
    return meta


def _json_field(meta: dict[str, str], key: str, source: str) -> dict[str, Any]:
    if key not in meta:
        raise ValueError(f"{source}: checkpoint metadata lacks {key!r}")
    try:
        value = json.loads(meta[key])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: checkpoint metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{source}: checkpoint metadata {key!r} must be a JSON object")
    return value


def model_from_bytes(
    data: bytes | bytearray | memoryview, *, source: str = "<bytes>"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from checkpoint bytes; returns (model, extra metadata).

    Any defect (truncation, foreign file, missing/invalid config, weights that
    do not fit the config) raises ValueError naming ``source``. The model is
    returned in eval mode on the CPU, in the dtypes its constructor creates.
    """
    data = bytes(data)  # accept bytearray / memoryview from storage backends
    meta = _read_header_metadata(data, source)
    if meta.get(KEY_FORMAT) != FORMAT:
        raise ValueError(f"{source}: checkpoint format {meta.get(KEY_FORMAT)!r}, "
                         f"expected {FORMAT!r}")
    config = _json_field(meta, KEY_CONFIG, source)
    extra = _json_field(meta, KEY_METADATA, source)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise ValueError(f"{source}: corrupt safetensors data: {exc}") from exc
    try:
        model = build_model(config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: cannot build model from stored config: {exc}") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not match the stored config: {exc}") from exc
    return model.eval(), extra


def save_model(model: nn.Module, path: str | os.PathLike,
               metadata: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (old file or new one, never a part) to a path or URL."""
    from adpm_dist.io import storage

    storage.write_bytes(os.fspath(path), model_to_bytes(model, metadata))


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Read a local checkpoint written by ``save_model``; returns (model, metadata)."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    return model_from_bytes(data, source=path)


def model_digest(model: nn.Module) -> str:
    """sha256 hex digest of the architecture and weights, independent of run and device.

    Hashes the canonical config JSON, then for every state-dict entry in
    sorted name order its name, dtype, shape and little-endian bytes (half
    precision as float32, as stored in checkpoints). Equal configs and weights give
    equal digests; a saved-and-loaded model has the digest of the original.
    """
    h = hashlib.sha256()
    h.update(b"adpm-model-digest/1\0")
    h.update(_canonical_json(_config_of(model)).encode())
    tensors = state_dict_fp32(model)
    for name in sorted(tensors):
        array = tensors[name].numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        h.update(b"\0" + name.encode() + b"\0")
        h.update(f"{array.dtype.str}{list(array.shape)}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()
