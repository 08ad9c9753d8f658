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
  them, else the paper's J); official ``official`` (the official code's ``_dp_seg``: the timeline cut
  where Γ_t first exceeds 1, the paper's J(s, t) minimised before the cut, even nodes after it).
- ``decoder`` — the NELBO's discretised-Gaussian decoder (:func:`likelihood.log_discretized_gaussian`):
  ours ``exact`` (Φ by ``log_ndtr``, no floor); official ``official`` (the official code's tanh
  approximation of Φ and a 1e-12 floor on each bin's probability: 2e-3 to 5e-3 bits/dim apart).
- ``zero_noise`` — a sampling step with σ² = 0 (:func:`samplers.run_reverse`): ours ``skip`` (no
  draw); official ``draw`` (drawn and multiplied by 0, so same-seed chains match the official code's
  draw for draw).
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
    decoder: str = "exact"
    zero_noise: str = "skip"

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def differences(self, other: Conventions) -> dict:
        return {k: v for k, v in self.describe().items() if other.describe()[k] != v}

    def with_overrides(self, **overrides) -> Conventions:
        """A copy with the given fields replaced (None: keep this one's)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


OURS = Conventions()
OFFICIAL = Conventions(covariance_fit="clip", ddim_direction="network", nll_clip_x0=True,
                       even_rounding="official", dp_cost="official", decoder="official",
                       zero_noise="draw")
