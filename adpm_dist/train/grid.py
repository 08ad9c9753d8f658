"""Sample grids during training: EMA samples (DDIM, even trajectory) tiled into one PNG,
enlarged (nearest-neighbour, by a whole factor) so that each sample is at least
``MIN_IMAGE_PX`` pixels wide: an 8×8 sample shows at 64×64, 28×28 at 84×84, 32×32 at 64×64."""

from __future__ import annotations

import io
import math

import torch

from adpm_dist.diffusion.schedule import Schedule

MIN_IMAGE_PX = 64  # a person can see an 8×8 digit at this size; 64×64 data is left as is


def tile(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] → one [C, rows·H, cols·W] grid, row-major, near-square."""
    count, c, h, w = imgs.shape
    cols = int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / cols))
    grid = torch.zeros((c, rows * h, cols * w), dtype=torch.uint8)
    for i in range(count):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = imgs[i]
    return grid


def upscale_factor(image_px: int) -> int:
    """The smallest whole factor that makes an ``image_px``-wide image at least MIN_IMAGE_PX
    wide (1 for images that already are)."""
    return max(1, -(-MIN_IMAGE_PX // int(image_px)))


def upscale(grid: torch.Tensor, image_px: int) -> torch.Tensor:
    """[C, H, W] grid of ``image_px``-wide images, each pixel repeated k×k times
    (k = :func:`upscale_factor`): no blur, no invented detail, what the model drew bigger."""
    k = upscale_factor(image_px)
    return grid.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)


def sample_grid_png(
    model: torch.nn.Module,
    schedule: Schedule,
    model_config: dict,
    *,
    steps: int,
    count: int,
    seed: int,
    device: torch.device,
) -> bytes:
    """``count`` DDIM samples of ``model`` with ``steps`` even steps, as PNG bytes
    (enlarged: see :func:`upscale`).

    Image i uses seed ``seed * 100003 + i``, so a grid does not depend on the batch.
    """
    from PIL import Image

    from adpm_dist.diffusion.samplers import make_generators, sample
    from adpm_dist.diffusion.trajectory import even_trajectory

    shape = (model_config["in_channels"], model_config["resolution"], model_config["resolution"])
    k = min(steps, schedule.num_timesteps)
    with torch.no_grad():
        imgs = sample(
            lambda x, n: model(x, n), schedule,
            even_trajectory(schedule.num_timesteps, k), "ddim",
            make_generators([seed * 100003 + i for i in range(count)], device=device),
            shape, device=device,
        )
    imgs = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = upscale(tile(imgs), shape[1])
    arr = grid.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if grid.shape[0] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
