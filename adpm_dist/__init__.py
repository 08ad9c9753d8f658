"""adpm_dist: Analytic-DPM (Bao et al., ICLR 2022) at cluster scale.

Read top-down: ``diffusion`` (pure maths) → ``models`` → ``gamma`` (the Γ file)
→ the stage entry points (``train``, ``estimate``, ``sample``, ``evaluate``)
→ ``launch``.
"""

__version__ = "0.1.0"
