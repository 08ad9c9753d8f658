"""The DDPM ε-prediction UNet (Ho et al., 2020), written for adpm_dist.

Architecture (as in the paper's official TensorFlow code):

* sinusoidal embedding of the timestep n (embedded exactly as given: the
  paper's n = 1..N) followed by a two-layer MLP (ch → 4ch → 4ch, SiLU);
* a 3×3 input convolution, then per resolution level ``num_res_blocks``
  residual blocks (GroupNorm → SiLU → conv, + projected time embedding,
  GroupNorm → SiLU → dropout → conv, 1×1 shortcut when widths differ),
  single- or multi-head self-attention after each block at the resolutions in
  ``attn_resolutions``, and a stride-2 convolution between levels;
* a middle block (residual, attention, residual);
* the mirror-image upsampling path with ``num_res_blocks + 1`` blocks per
  level, each fed the concatenation with one stored skip activation, and
  nearest-neighbour ×2 upsampling followed by a 3×3 convolution;
* GroupNorm → SiLU → 3×3 output convolution.

Initialisation follows the official code: fan-average uniform (Xavier) weights,
zero biases, and a near-zero scale (1e-10) for the last layer of every residual
branch, of every attention block and of the network, so that each block starts
as the identity and a fresh network predicts ε ≈ 0.

Every instance carries ``model.config``: a JSON-serialisable dict with
``"type": "unet"`` and every constructor argument, so that
``adpm_dist.models.registry.build_model(model.config)`` rebuilds it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "unet"


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``.

    32 groups as in DDPM whenever that leaves at least two channels per group;
    narrower layers (the tiny test model) get the largest divisor of
    ``channels`` that does, so every group still normalises across channels.
    """
    for groups in range(min(max_groups, max(1, channels // 2)), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


def timestep_embedding(n: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``n`` (shape [B]) into ``dim`` features.

    As in DDPM: with h = dim // 2 frequencies f_i = 10000^(-i/(h-1)), the
    embedding is [sin(n f_0..f_{h-1}), cos(n f_0..f_{h-1})] (zero-padded when
    ``dim`` is odd). Computed in float32 whatever the model dtype, because
    n · f reaches N = 4000 and half precision would alias nearby timesteps.
    """
    if n.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(n.shape)}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"embedding dim must be >= 4, got {dim}")
    exponent = torch.arange(half, dtype=torch.float32, device=n.device) / (half - 1)
    freqs = torch.exp(-math.log(10000.0) * exponent)
    args = n.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _init_layer(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """DDPM's ``variance_scaling(scale, 'fan_avg', 'uniform')`` with zero bias.

    ``scale == 0`` becomes 1e-10 as in the official code: the layer starts
    (almost) silent, but its weights are not exactly zero.
    """
    scale = 1e-10 if scale == 0 else scale
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        layer.weight.uniform_(-limit, limit)
        if layer.bias is not None:
            layer.bias.zero_()


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
          init_scale: float = 1.0) -> nn.Conv2d:
    pad = kernel // 2 if padding is None else padding
    layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad)
    _init_layer(layer, init_scale)
    return layer


def _linear(c_in: int, c_out: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    _init_layer(layer, init_scale)
    return layer


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding.

    With ``scale_shift_norm`` (Improved DDPM) the embedding gives a per-channel
    scale and shift applied after the second GroupNorm instead of a bias
    added before it.
    """

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float,
                 scale_shift_norm: bool = False) -> None:
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.norm1 = group_norm(c_in)
        self.conv1 = _conv(c_in, c_out)
        self.temb_proj = _linear(temb_ch, 2 * c_out if scale_shift_norm else c_out)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(c_out, c_out, init_scale=0.0)
        self.shortcut = _conv(c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift_norm:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Self-attention over all spatial positions (residual, pre-GroupNorm)."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention width {channels} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, kernel=1)
        self.proj_out = _conv(channels, channels, kernel=1, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        # [B, heads, HW, C/heads] for scaled_dot_product_attention (scale 1/sqrt(C/heads)).
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution with TensorFlow 'SAME' padding (right/bottom only).

    The asymmetric padding matches the official DDPM weights, so an adapter can
    load converted checkpoints without shifting every feature map by a pixel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _maybe_attn(c: int, size: int, heads: int, at: Sequence[int]) -> nn.Module:
    return AttnBlock(c, heads) if size in at else nn.Identity()


def _down_path(ch: int, ch_mult: list[int], num_res_blocks: int, size: int, res, attn):
    """(the down levels, the skip widths they store, the width at the bottom)."""
    down = nn.ModuleList()
    skip_ch = [ch]
    c = ch
    for level, mult in enumerate(ch_mult):
        stage = nn.Module()
        stage.blocks = nn.ModuleList()
        stage.attns = nn.ModuleList()
        for _ in range(num_res_blocks):
            stage.blocks.append(res(c, ch * mult))
            c = ch * mult
            stage.attns.append(attn(c, size))
            skip_ch.append(c)
        if level != len(ch_mult) - 1:
            stage.downsample = Downsample(c)
            size //= 2
            skip_ch.append(c)
        down.append(stage)
    return down, skip_ch, c


def _up_path(ch: int, ch_mult: list[int], num_res_blocks: int, size: int, skip_ch: list[int],
             c: int, res, attn):
    """(the up levels in forward order, coarsest first; the output width). Consumes skip_ch."""
    up = nn.ModuleList()
    for level in reversed(range(len(ch_mult))):
        stage = nn.Module()
        stage.blocks = nn.ModuleList()
        stage.attns = nn.ModuleList()
        for _ in range(num_res_blocks + 1):
            stage.blocks.append(res(c + skip_ch.pop(), ch * ch_mult[level]))
            c = ch * ch_mult[level]
            stage.attns.append(attn(c, size))
        if level != 0:
            stage.upsample = Upsample(c)
            size *= 2
        up.append(stage)
    assert not skip_ch, "every skip activation must be consumed"
    return up, c


class UNet(nn.Module):
    """DDPM UNet predicting ε from (x_n, n).

    Args:
        in_channels / out_channels: image channels in and out (equal for ε).
        resolution: height = width of the data the model is called with.
        ch: base width; level i has width ``ch * ch_mult[i]``.
        ch_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per level on the way down.
        attn_resolutions: feature-map sizes (of the padded input) that get
            self-attention after each residual block, e.g. (16,).
        dropout: dropout rate inside residual blocks.
        pad_to: if set, inputs are zero-padded (centred) from ``resolution`` to
            ``pad_to`` and the output is cropped back, so MNIST stays 28×28
            while the network sees 32×32.
        num_heads: attention heads (DDPM: 1; Improved DDPM ImageNet: 4).
        scale_shift_norm: Improved DDPM's time-conditioned GroupNorm.

    ``forward(x, n)`` with x: [B, in_channels, resolution, resolution] and
    n: integer timesteps [B] (or a scalar) returns ε̂ with x's shape.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        resolution: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        pad_to: int | None = None,
        num_heads: int = 1,
        scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult = [int(m) for m in ch_mult]
        attn_resolutions = sorted({int(r) for r in attn_resolutions}, reverse=True)
        internal = resolution if pad_to is None else int(pad_to)
        self._check_args(resolution, internal, ch_mult, attn_resolutions, num_res_blocks, dropout)

        self.config: dict = {
            "type": MODEL_TYPE,
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "resolution": int(resolution),
            "ch": int(ch),
            "ch_mult": ch_mult,
            "num_res_blocks": int(num_res_blocks),
            "attn_resolutions": attn_resolutions,
            "dropout": float(dropout),
            "pad_to": None if pad_to is None else int(pad_to),
            "num_heads": int(num_heads),
            "scale_shift_norm": bool(scale_shift_norm),
        }
        self.in_channels = in_channels
        self.resolution = resolution
        self.internal_resolution = internal
        self.ch = ch

        temb_ch = 4 * ch
        self.temb = nn.Sequential(_linear(ch, temb_ch), nn.SiLU(), _linear(temb_ch, temb_ch))
        self.conv_in = _conv(in_channels, ch)
        # Built in this order (down, mid, up, out): the order parameters draw their init.
        res = functools.partial(ResBlock, temb_ch=temb_ch, dropout=dropout,
                                scale_shift_norm=scale_shift_norm)
        attn = functools.partial(_maybe_attn, heads=num_heads, at=attn_resolutions)
        # skip_ch records the width of every activation stored for a skip.
        self.down, skip_ch, c = _down_path(ch, ch_mult, num_res_blocks, internal, res, attn)
        self.mid_block1 = res(c, c)
        self.mid_attn = AttnBlock(c, num_heads)
        self.mid_block2 = res(c, c)
        size = internal // 2 ** (len(ch_mult) - 1)
        self.up, c = _up_path(ch, ch_mult, num_res_blocks, size, skip_ch, c, res, attn)
        self.norm_out = group_norm(c)
        self.conv_out = _conv(c, out_channels, init_scale=0.0)

    @staticmethod
    def _check_args(resolution: int, internal: int, ch_mult: list[int],
                    attn_resolutions: list[int], num_res_blocks: int, dropout: float) -> None:
        if not ch_mult or num_res_blocks < 1:
            raise ValueError("ch_mult must be non-empty and num_res_blocks >= 1")
        if internal < resolution:
            raise ValueError(f"pad_to={internal} is smaller than resolution={resolution}")
        factor = 2 ** (len(ch_mult) - 1)
        if internal % factor:
            raise ValueError(
                f"resolution {internal} is not divisible by 2^{len(ch_mult) - 1} "
                f"(ch_mult has {len(ch_mult)} levels)")
        sizes = [internal // 2**i for i in range(len(ch_mult))]
        missing = [r for r in attn_resolutions if r not in sizes]
        if missing:
            raise ValueError(f"attn_resolutions {missing} not among the feature sizes {sizes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects x of shape [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(x.shape)}")
        n = torch.as_tensor(n, device=x.device)
        if n.ndim == 0:
            n = n.expand(x.shape[0])
        if n.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {tuple(n.shape)}")

        pad = self.internal_resolution - self.resolution
        lo = pad // 2
        if pad:
            x = F.pad(x, (lo, pad - lo, lo, pad - lo))

        temb = self.temb(timestep_embedding(n, self.ch).to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)

        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)

        h = self.conv_out(F.silu(self.norm_out(h)))
        if pad:
            h = h[:, :, lo:lo + self.resolution, lo:lo + self.resolution]
        return h


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
