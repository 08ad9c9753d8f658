"""The Γ statistics file: Γ_t and the model-error moments — accumulate, merge, read, check.

:mod:`~adpm_dist.gamma.file` (the format, read/write/validate), :mod:`~adpm_dist.gamma.moments`
(the model-error statistics), :mod:`~adpm_dist.gamma.merge` (exact merges, overlap refusal),
:mod:`~adpm_dist.gamma.ref` (what consumers load: :func:`load_for`, :class:`GammaRef`, the checks).
"""

from adpm_dist.gamma.file import (
    FORMAT,
    FORMAT_1,
    FORMAT_3,
    FORMATS,
    PER_T_FIELDS,
    GammaFile,
    GammaFileError,
    from_dict,
    loads,
    read_gamma,
    write_gamma,
)
from adpm_dist.gamma.merge import find_overlap, lacking_moments, merge, spans, summary
from adpm_dist.gamma.moments import Moments, pair_errors
from adpm_dist.gamma.ref import GammaRef, check_model, check_schedule, load_for, require_moments

__all__ = ["FORMAT", "FORMAT_1", "FORMAT_3", "FORMATS", "PER_T_FIELDS", "GammaFile", "GammaFileError",
           "GammaRef",
           "Moments", "check_model", "check_schedule", "find_overlap", "from_dict", "lacking_moments",
           "load_for", "loads", "merge", "pair_errors", "read_gamma", "require_moments", "spans", "summary",
           "write_gamma"]
