"""Sample grids during training: EMA samples (DDIM, even trajectory) tiled into one PNG."""

from __future__ import annotations

import io
import math

import torch

from adpm_dist.diffusion.schedule import Schedule


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
    """``count`` DDIM samples of ``model`` with ``steps`` even steps, as PNG bytes.

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
            make_generators([seed * 100003 + i for i in range(count)]),
            shape, device=device,
        )
    imgs = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = tile(imgs)
    arr = grid.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if grid.shape[0] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
