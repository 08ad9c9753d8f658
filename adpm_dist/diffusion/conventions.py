"""Where adpm_dist chooses differently from the official Analytic-DPM code — each one switch away.

Every choice below is valid; the official code's is one flag (``--official``) or one field away,
and docs/sample_evaluate.md states the defaults. Ours differs from the official in every field
but the DDIM direction.

- ``covariance_fit`` — how (β̄_t/ᾱ_t)(1 − Γ_t) is made feasible (:func:`analytic.covariance_estimate`):
  ours ``weighted`` (clip, then an isotonic fit weighted by the estimate's standard errors);
  official ``clip`` (Theorem 2's bounds only).
- ``ddim_direction`` — the DDIM mean's noise direction (:func:`samplers.run_reverse`): ours and
  official ``network`` (the network's ε̂; diffusers' ``use_clipped_model_output=False``); ``x0``
  (re-derived from the clipped x̂₀) was ours until the FIDs of docs/RESULTS.md §3 (K = 10, 25)
  showed it worse on our MNIST model.
- ``nll_clip_x0`` — whether the NELBO's means use x̂₀ clamped to the data range
  (:func:`likelihood.negative_elbos`): ours no; official yes.
- ``even_rounding`` — the even trajectory's nodes (:func:`trajectory.even_trajectory`): ours
  ``half-up`` (exact nodes, halves up); official ``official`` (float accumulation, half to even).
- ``dp_cost`` — what the optimal trajectory minimises (:func:`trajectory.optimal_trajectory`):
  ours ``auto`` (the method's expected NELBO from the model-error moments when the Γ file has
  them, else the paper's J); official ``paper`` (J(s, t), Analytic-DPM's variance for every method).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Conventions:
    covariance_fit: str = "weighted"
    ddim_direction: str = "network"
    nll_clip_x0: bool = False
    even_rounding: str = "half-up"
    dp_cost: str = "auto"

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def differences(self, other: Conventions) -> dict:
        return {k: v for k, v in self.describe().items() if other.describe()[k] != v}

    def with_overrides(self, **overrides) -> Conventions:
        """A copy with the given fields replaced (None: keep this one's)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


OURS = Conventions()
OFFICIAL = Conventions(covariance_fit="clip", ddim_direction="network", nll_clip_x0=True,
                       even_rounding="official", dp_cost="paper")
