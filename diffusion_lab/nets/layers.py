"""Building blocks of the conditional U-Net (ADM / DiT style), all on (B, C, H, W) feature maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# --------------------------------------------------------------------------- timestep embedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


class TimestepEmbedder(nn.Module):
    """Sinusoid -> MLP, as in ADM and DiT. The sinusoid width is the first channel count."""

    def __init__(self, freq_dim: int, emb_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, emb_dim)


# --------------------------------------------------------------------------- residual block


class ResBlock(nn.Module):
    """GN-SiLU-conv twice; `emb` enters as scale and shift on the second GroupNorm (ADM's
    `use_scale_shift_norm`), which conditions more strongly than adding it to the features."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


# --------------------------------------------------------------------------- attention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, C/heads)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, residual with zero-init output."""

    def __init__(self, channels: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = zero_(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        x = self.norm(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (_heads(z, self.heads) for z in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, c)
        return h + self.out(y).transpose(1, 2).reshape(b, c, hh, ww)


class CrossAttention(nn.Module):
    """Queries from the feature map, keys/values from context tokens (B, L, D) under a padding mask."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"cross-attention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = zero_(nn.Linear(channels, channels))

    def forward(
        self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, hh, ww = h.shape
        q = _heads(self.q(self.norm(h).flatten(2).transpose(1, 2)), self.heads)  # (B, heads, HW, d)
        k, v = (_heads(z, self.heads) for z in self.kv(context).chunk(2, dim=-1))  # (B, heads, L, d)
        attn_mask = None
        if mask is not None:
            # A row with no valid token would give NaN (softmax over nothing): let it see all tokens.
            mask = mask.bool() | ~mask.bool().any(dim=-1, keepdim=True)
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return h + self.out(y.transpose(1, 2).reshape(b, hh * ww, c)).transpose(1, 2).reshape(b, c, hh, ww)


# --------------------------------------------------------------------------- adaLN-Zero


class AdaLNZeroBlock(nn.Module):
    """DiT's adaLN-Zero for feature maps: h + gate(c) * f(GN(h) * (1 + scale(c)) + shift(c)).

    The modulation Linear is zero-initialised here, next to its use, so gate = 0 and a fresh block
    is exactly the identity. f is DiT's pointwise MLP (as 1x1 convs): the res blocks already mix
    space, and a 3x3 here would add ~40% to the net's FLOPs for one block per level.
    """

    def __init__(self, channels: int, emb_dim: int, groups: int = 8, expansion: int = 2):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)  # the affine part comes from c
        self.modulation = zero_(nn.Linear(emb_dim, 3 * channels))
        self.f = nn.Sequential(
            nn.Conv2d(channels, expansion * channels, 1),
            nn.SiLU(),
            nn.Conv2d(expansion * channels, channels, 1),
        )

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(c))[:, :, None, None].chunk(3, dim=1)  # (B, C, 1, 1)
        return h + gate * self.f(self.norm(h) * (1 + scale) + shift)


# --------------------------------------------------------------------------- resampling


class Downsample(nn.Module):
    """Stride-2 3x3 conv: 28 -> 14 -> 7 (and 7 -> 4), no padding of the image to a power of two."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def upsample(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest upsampling to the skip's size, so odd sizes round-trip (7 -> 14 -> 28, 4 -> 7).

    No conv here: the next ResBlock's 3x3 conv mixes the upsampled map with the skip anyway, and a
    conv at the high resolution with the low level's width would cost as much as a whole ResBlock.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")
