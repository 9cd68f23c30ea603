"""How the network takes in a `Condition`: named strategies behind one interface.

Latent-diffusion's vocabulary without its magic strings: concat -> extra input channels, crossattn ->
attention on `condition.tokens` (the "context"), adm/adaln -> the embedding given to the res blocks.
Hydra builds each class as a `_partial_: true` factory; the net finishes it with `emb_dim=...`:

    method = conditioning(emb_dim=emb_dim)
    x = method.prepare_input(x, condition)        # (B, C + method.extra_in_channels, H, W)
    emb = method.embed(temb, condition)            # (B, emb_dim) for every ResBlock
    block = method.make_block(ch, res, attention=..., groups=...)   # None or block(h, emb, condition)

`condition=None` always means "unconditional" and must work for every method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.nets.layers import AdaLNZeroBlock, CrossAttention


class ConditioningMethod(nn.Module):
    """Default behaviour of every hook: leave things as they are (this is also `NoConditioning`)."""

    extra_in_channels: int = 0

    def __init__(self, cond_dim: int | None = None, emb_dim: int = 128, embed_pooled: bool = False):
        super().__init__()
        self.cond_dim, self.emb_dim = cond_dim, emb_dim
        # ADM's class embedding: MLP(pooled) added to the time embedding, which every res block's
        # scale-shift norm reads. The null condition is a learned vector, so CFG's unconditional pass
        # goes through the same MLP; `condition=None` just leaves the time embedding.
        self.mlp = (
            nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if embed_pooled
            else None
        )

    def prepare_input(self, x: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        return x

    def embed(self, temb: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        if condition is None or self.mlp is None:
            return temb
        return temb + self.mlp(condition.pooled.to(temb.dtype))  # (B, emb_dim)

    def make_block(self, channels: int, resolution: int, attention: bool = False, groups: int = 8):
        """A block the net inserts after the res blocks of a level (down, middle and up paths).

        `attention` says whether the net puts self-attention at this resolution; `groups` is the net's
        GroupNorm group count. Returns None when this method adds nothing there.
        """
        return None


class NoConditioning(ConditioningMethod):
    """Unconditional baseline: ignores the condition entirely."""


# --------------------------------------------------------------------------- concat


class ConcatConditioning(ConditioningMethod):
    """pooled -> Linear -> a (k, s, s) map, upsampled to the image size and stacked on the input.

    A coarse map (s = 7 by default) keeps the Linear small; the U-Net's first convs spread it out.
    `embed_pooled=True` also adds the condition to the res blocks' embedding (concat + ADM's embedding).
    """

    def __init__(
        self,
        cond_dim: int,
        emb_dim: int,
        map_channels: int = 4,
        map_size: int = 7,
        embed_pooled: bool = False,
    ):
        super().__init__(cond_dim, emb_dim, embed_pooled)
        self.extra_in_channels, self.map_size = map_channels, map_size
        self.to_map = nn.Linear(cond_dim, map_channels * map_size * map_size)

    def prepare_input(self, x: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        b, _, h, w = x.shape
        if condition is None:  # unconditional: a zero map keeps the input width fixed
            m = x.new_zeros(b, self.extra_in_channels, h, w)
        else:
            m = self.to_map(condition.pooled).view(b, self.extra_in_channels, self.map_size, self.map_size)
            m = F.interpolate(m.to(x.dtype), size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([x, m], dim=1)  # (B, C + k, H, W)


# --------------------------------------------------------------------------- cross-attention


class _CrossAttnBlock(nn.Module):
    def __init__(self, attn: CrossAttention):
        super().__init__()
        self.attn = attn

    def forward(self, h: torch.Tensor, emb: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        if condition is None:
            return h
        return self.attn(h, condition.tokens.to(h.dtype), condition.mask)


class CrossAttnConditioning(ConditioningMethod):
    """Cross-attention from the feature map to `condition.tokens` wherever the net has self-attention."""

    def __init__(self, cond_dim: int, emb_dim: int, heads: int = 4):
        super().__init__(cond_dim, emb_dim)
        self.heads = heads

    def make_block(self, channels: int, resolution: int, attention: bool = False, groups: int = 8):
        if not attention:
            return None
        return _CrossAttnBlock(CrossAttention(channels, self.cond_dim, self.heads, groups))


# --------------------------------------------------------------------------- adaLN-Zero


class _AdaLNBlock(nn.Module):
    def __init__(self, block: AdaLNZeroBlock):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor, emb: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        return self.block(h, emb)  # emb already carries the condition (see AdaLNConditioning.embed)


class AdaLNConditioning(ConditioningMethod):
    """DiT-style: c = temb + MLP(pooled) drives the res blocks' scale-shift norms and one adaLN-Zero
    block per level. The null condition is a learned vector, so CFG's unconditional pass goes
    through the same MLP; `condition=None` just leaves c = temb.
    """

    def __init__(self, cond_dim: int, emb_dim: int):
        super().__init__(cond_dim, emb_dim, embed_pooled=True)

    def make_block(self, channels: int, resolution: int, attention: bool = False, groups: int = 8):
        return _AdaLNBlock(AdaLNZeroBlock(channels, self.emb_dim, groups))
