"""``--compile`` / ``train.compile``: optionally run an ε-network through ``torch.compile``.

Off by default: on CPU the first call compiles for tens of seconds with a C++ toolchain, and a
compiled network's float32 output may differ from eager's in the last bits (fused kernels), so
the flag is recorded with a run's options but is not part of what identifies its numbers.
"""

from __future__ import annotations

import torch


def maybe_compiled(model: torch.nn.Module, compile_it: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``compile_it``, else ``model`` itself (parameters shared)."""
    if not compile_it:
        return model
    return torch.compile(model)


__all__ = ["maybe_compiled"]
