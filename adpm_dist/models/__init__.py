"""ε-networks: the DDPM UNet presets, the exact mixture oracle, and checkpoint I/O."""

from adpm_dist.models.oracle import GaussianMixtureEps
from adpm_dist.models.registry import MODEL_TYPES, PRESETS, build_model, register_model_type

register_model_type("gaussian-mixture", GaussianMixtureEps)

__all__ = ["GaussianMixtureEps", "MODEL_TYPES", "PRESETS", "build_model", "register_model_type"]
