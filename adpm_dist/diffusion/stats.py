"""Mean and standard error from running sums: the one place this is computed.

Every accumulator in the package keeps (Σ v, Σ v², n) in float64 so that ranks
and runs add exactly; this turns those sums into the mean and the standard
error of the mean (sample standard deviation with Bessel's correction, / √n).
"""

from __future__ import annotations

import numpy as np


def mean_stderr(total, total_sq, count) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard error of the mean) elementwise from (Σ v, Σ v², n).

    Where n = 0 both are 0; where n = 1 the standard error is 0 (it is unknown).
    Accepts scalars or arrays; returns float64 arrays of the broadcast shape.
    """
    s = np.asarray(total, dtype=np.float64)
    sq = np.asarray(total_sq, dtype=np.float64)
    n = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, s / np.maximum(n, 1), 0.0)
        var = np.where(n > 1, (sq - n * mean**2) / np.maximum(n - 1, 1), 0.0)
        stderr = np.sqrt(np.maximum(var, 0.0) / np.maximum(n, 1))
    return mean, stderr
