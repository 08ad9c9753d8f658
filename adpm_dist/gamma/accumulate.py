"""A Γ file's running sums on the device: add a forward batch without a host round trip.

:meth:`GammaFile.add` takes NumPy arrays, so the Γ job used to copy every batch's ‖ε‖²/d and
model-error statistics to the host (a device sync per batch). :class:`DeviceSums` keeps the
same running sums — Γ's (Σv, Σv², count), the moments' (:mod:`adpm_dist.gamma.moments`) and
half A's (format 3) — as one float64 vector on the device, adds each batch with one
``index_put_(accumulate=True)``, and copies them back into the GammaFile once per round
(:meth:`DeviceSums.sync`, before the partial state is written and the ranks reduce).

Order of the additions. CPU: ``index_put_`` accumulates doubles serially, so every sum
receives the pairs' values one at a time, in pair order, starting from the value it held: Γ's
sums and counts and the per-t moments are bit-identical to :meth:`GammaFile.add`
(``np.add.at``, the same order; tests/test_noise_stream.py). The three scalar statistics
(``x0_sq``, ``decoder_nll*``) were added there as one NumPy sum per batch (pairwise
summation), here pair by pair: equal to float64 rounding (~3e-15 relative measured), not bit
for bit. CUDA (read from PyTorch's ``index_put_with_sort_kernel``, not run here): the indices
are radix-sorted (stable) and each slot's values of one batch are summed (a warp reduction
beyond 32 of them), then added to the slot — deterministic for the same batches, equal to the
CPU order to float64 rounding. Counts travel as float64 (exact to 2**53).
"""

from __future__ import annotations

import numpy as np
import torch

from adpm_dist.gamma.moments import PER_T, SCALARS, Moments


class DeviceSums:
    """Running sums of ``gf`` (a GammaFile with moments; its ``half`` too, when kept) on ``device``.

    ``add(t, values, errors, half)`` takes device tensors: ``t`` the timesteps (1..N), ``values``
    ‖ε‖²/d (float64), ``errors`` :func:`~adpm_dist.gamma.moments.pair_errors_device`'s dict and
    ``half`` each pair's sample-id parity (0 = half A), as :meth:`GammaFile.add` does.
    """

    def __init__(self, gf, device):
        if gf.moments is None:
            raise ValueError("DeviceSums keeps the model-error moments: the Γ file must have them")
        self.gf, self.n, self.device = gf, gf.num_timesteps, torch.device(device)
        half = getattr(gf, "half", None)
        self.half = DeviceSums(half, device) if half is not None else None
        m = gf.moments
        host = np.concatenate([gf.sum, gf.sum_sq, gf.count.astype(np.float64), m.per_t.ravel(),
                               m.scalars.ravel(), [0.0]])
        self.trash = host.size - 1  # additions that belong nowhere land here (never read)
        self.flat = torch.from_numpy(host).to(self.device)

    def add(self, t: torch.Tensor, values: torch.Tensor, errors: dict, half: torch.Tensor | None = None):
        t0 = t.to(self.device, torch.int64) - 1
        if self.half is not None:
            if half is None:
                raise ValueError("this Γ file keeps the two halves' sums: add() needs each pair's half")
            self.half._add(t0, values, errors, keep=half.to(self.device) == 0)
        self._add(t0, values, errors, keep=None)

    def _add(self, t0: torch.Tensor, v: torch.Tensor, errors: dict, keep: torch.Tensor | None) -> None:
        n, ones = self.n, torch.ones_like(v)
        idx, vals = [t0, n + t0, 2 * n + t0], [v, v * v, ones]
        for i, key in enumerate(PER_T):  # per_t[i, 0] at 3n + 2i·n, per_t[i, 1] at 3n + (2i+1)·n
            e = errors[key].to(torch.float64)
            idx += [(3 + 2 * i) * n + t0, (4 + 2 * i) * n + t0]
            vals += [e, e * e]
        base, first = 13 * n, t0 == 0  # scalars (3, 3) after the per-t sums
        for i, key in enumerate(SCALARS):
            e = errors[key].to(torch.float64)
            rows = torch.ones_like(first) if key == "x0_sq" else first  # the decoder: pairs at t = 1
            e = torch.where(rows, e, 0.0)
            for j, val in enumerate((e, e * e, rows.to(torch.float64))):
                idx.append(torch.where(rows, base + 3 * i + j, self.trash))
                vals.append(val)
        index = torch.cat([i.expand_as(t0) for i in idx])
        if keep is not None:
            index = torch.where(keep.repeat(len(idx)), index, self.trash)
        self.flat.index_put_((index,), torch.cat(vals), accumulate=True)

    def sync(self) -> None:
        """Copy the sums back into the GammaFile (one device→host transfer; new arrays)."""
        host = self.flat.cpu().numpy()
        n, gf = self.n, self.gf
        gf.sum, gf.sum_sq = host[:n].copy(), host[n:2 * n].copy()
        gf.count = np.rint(host[2 * n:3 * n]).astype(np.int64)
        per_t = host[3 * n:13 * n].reshape(len(PER_T), 2, n).copy()
        scalars = host[13 * n:13 * n + 3 * len(SCALARS)].reshape(len(SCALARS), 3).copy()
        scalars[:, 2] = np.rint(scalars[:, 2])
        gf.moments = Moments(per_t, scalars)
        if self.half is not None:
            self.half.sync()


__all__ = ["DeviceSums"]
