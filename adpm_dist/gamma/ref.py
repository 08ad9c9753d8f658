"""A Γ file as its consumers use it: read once, hashed, checked against the model and schedule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from adpm_dist.diffusion.residual import ErrorMoments
from adpm_dist.errors import raised_by_check
from adpm_dist.gamma.file import GammaFile, GammaFileError, loads, read_raw
from adpm_dist.io.storage import redact
from adpm_dist.models.loading import mode_warning


def check_schedule(gamma_file: GammaFile, schedule, source: str = "Γ file") -> None:
    """Refuse a Γ file estimated under another schedule, naming both."""
    want = schedule.describe()
    got = gamma_file.schedule
    if (got.get("betas_sha256"), got.get("num_timesteps")) != (want["betas_sha256"], want["num_timesteps"]):
        raise GammaFileError(
            f"{source} was estimated for schedule {got.get('name')!r} "
            f"(N={got.get('num_timesteps')}, betas sha256 {str(got.get('betas_sha256'))[:12]}…) "
            f"but the model uses {want['name']!r} (N={want['num_timesteps']}, "
            f"betas sha256 {want['betas_sha256'][:12]}…)"
        )


def check_model(gamma_file: GammaFile, digest: str, name: str = "", source: str = "Γ file") -> None:
    """Refuse a Γ file estimated with another network, naming both (or, when the names agree,
    saying that the weights differ)."""
    got = gamma_file.model
    if got.get("digest") == digest:
        return
    old = f"digest {str(got.get('digest'))[:12]}…"
    if name and got.get("name") == name:
        raise GammaFileError(
            f"{source} was estimated with model {name!r} ({old}) and the model in use has the same "
            f"architecture and name, different weights (another run or checkpoint; digest {digest[:12]}…)")
    raise GammaFileError(
        f"{source} was estimated with model {got.get('name', '?')!r} ({old}) but the model in use is "
        f"{name or '?'!r} (digest {digest[:12]}…)")


@dataclass(frozen=True, eq=False)
class GammaRef:
    """A Γ file as its consumers use it: read once, hashed, checked (see :func:`load_for`).

    ``gamma`` is the length-(N+1) vector (index 0 and missing timesteps NaN),
    ``sha256`` the digest of the very bytes that were parsed, ``schedule`` the
    schedule it was checked against (or rebuilt from the file when no model was given).
    """

    gamma: np.ndarray
    sha256: str
    url: str
    file: GammaFile
    schedule: object

    @property
    def stderr(self) -> np.ndarray:
        """s.e.(Γ_n) laid out like ``gamma`` (length N+1, index 0 and missing timesteps NaN): the
        weights of the ``weighted`` covariance fit (:func:`adpm_dist.diffusion.analytic.covariance_estimate`),
        passed wherever σ² or a trajectory is built."""
        f = self.file
        return np.concatenate([[np.nan], np.where(f.count > 0, f.stderr, np.nan)])

    def moments(self, clip_x0: bool = True) -> ErrorMoments | None:
        """The model-error moments (:meth:`GammaFile.error_moments`); None for a format-1 file."""
        return self.file.error_moments(clip_x0)

    def mode_warning(self, wanted: str) -> str | None:
        """The ``warning:`` line when this file was estimated in another numeric mode than
        ``wanted`` (:func:`adpm_dist.models.loading.mode_warning`); None when they match."""
        recorded = (self.file.extra.get("fingerprint") or {}).get("precision")
        return mode_warning(recorded, wanted, f"--gamma {redact(self.url)}")


def require_moments(ref_or_file: GammaRef | GammaFile, what: str, clip_x0: bool = True) -> ErrorMoments:
    """The model-error moments, or a GammaFileError naming the file and ``what`` needs them."""
    gf = ref_or_file.file if isinstance(ref_or_file, GammaRef) else ref_or_file
    moments = gf.error_moments(clip_x0)
    if moments is None:
        name = ref_or_file.url if isinstance(ref_or_file, GammaRef) else (gf.source or "the Γ file")
        raise GammaFileError(
            f"no model-error moments: {name} is a format-1 Γ file without the model-error moments that "
            f"{what} needs; re-run the Γ job (adpm_dist.estimate) with this version")
    return moments


def load_for(model, url: str, schedule=None) -> GammaRef:
    """Read the Γ file at ``url`` ONCE and check it fits ``model`` (a LoadedModel, or None).

    Checks, each naming the file and both sides: the format (:func:`loads`), the
    schedule (``model.schedule``, else ``schedule``, else the file's own schedule
    description must rebuild with its betas digest) and, given a model, its digest.
    Partial files (a Γ job run with ``--timesteps``) are accepted; the trajectory
    and variance code refuses the timesteps they lack.
    """
    from adpm_dist.diffusion.schedule import schedule_from_description

    raw, text = read_raw(url)
    gf = loads(text, url, require_complete=False)
    source = f"Γ file {url}"
    sched = model.schedule if model is not None else schedule
    if sched is None:
        try:
            sched = schedule_from_description(gf.schedule, source)
        except ValueError as exc:  # the schedule layer's checks of the file's description
            if not raised_by_check(exc, "adpm_dist.diffusion"):
                raise
            raise GammaFileError(str(exc)) from None
    check_schedule(gf, sched, source=source)
    if model is not None:
        check_model(gf, model.digest, model.name, source=source)
    return GammaRef(gf.gamma_vector(), hashlib.sha256(raw).hexdigest(), url, gf, sched)
