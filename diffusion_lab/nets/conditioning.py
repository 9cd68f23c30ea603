"""How the network takes in a `Condition`: named strategies behind one interface.

Latent-diffusion's vocabulary without its magic strings: concat -> extra input channels, crossattn ->
attention on `condition.tokens` (the "context"), adm/adaln -> the embedding given to the res blocks.
Hydra builds each class as a `_partial_: true` factory; the net finishes it with `emb_dim=...`:

    method = conditioning(emb_dim=emb_dim)
    x = method.prepare_input(x, condition)        # (B, C + method.extra_in_channels, H, W)
    emb = method.embed(temb, condition)            # (B, emb_dim) for every ResBlock
    block = method.make_block(ch, res, attention=..., groups=...)   # None or block(h, emb, condition)

Several named conditions at once go through `CombinedConditioning`, one method per condition.
`condition=None` always means "unconditional" and must work for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.condition import Condition, Conditions
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

    @property
    def reads(self) -> set[str]:
        """Which parts of a `Condition` this method reads ("tokens", "pooled", "spatial"), so an encoder can
        leave out what nobody reads (SpatialEncoder.read_by)."""
        return {"pooled"} if self.mlp is not None else set()

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
    """The condition as extra input channels at full resolution (latent diffusion's "concat").

    A spatial condition (`spatial_channels` = its map's channels) is stacked as it is, with its "present"
    channel: its true form, as in super-resolution and inpainting models. A vector condition (class,
    caption) goes pooled -> Linear -> a (k, s, s) map, upsampled to the image size: a coarse map (s = 7 by
    default) keeps the Linear small, and the U-Net's first convs spread it out.
    `embed_pooled=True` also adds the condition to the res blocks' embedding (concat + ADM's embedding).
    """

    def __init__(
        self,
        cond_dim: int,
        emb_dim: int,
        map_channels: int = 4,
        map_size: int = 7,
        embed_pooled: bool = False,
        spatial_channels: int | None = None,
    ):
        super().__init__(cond_dim, emb_dim, embed_pooled)
        self.spatial = spatial_channels is not None
        self.extra_in_channels = spatial_channels + 1 if self.spatial else map_channels
        self.map_size = map_size
        self.to_map = None if self.spatial else nn.Linear(cond_dim, map_channels * map_size * map_size)

    @property
    def reads(self) -> set[str]:
        return super().reads | {"spatial" if self.spatial else "pooled"}

    def prepare_input(self, x: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        b, _, h, w = x.shape
        if condition is None:  # unconditional: a zero map (present = 0) keeps the input width fixed
            m = x.new_zeros(b, self.extra_in_channels, h, w)
        elif self.spatial:
            if condition.spatial is None:
                raise ValueError("this concat conditioning stacks a spatial map, and the condition has none")
            m = condition.spatial.to(x.dtype)
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

    @property
    def reads(self) -> set[str]:
        return {"tokens"}

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


# --------------------------------------------------------------------------- several conditions


class _PerSourceBlocks(nn.Module):
    """The blocks of several methods at one place in the net, each reading its own named condition."""

    def __init__(self, blocks: dict[str, nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, condition: Conditions | None) -> torch.Tensor:
        for name, block in self.blocks.items():
            h = block(h, emb, None if condition is None else condition[name])
        return h


class CombinedConditioning(ConditioningMethod):
    """One method per named condition of a `CombinedEncoder` (e.g. sketch -> concat, text ->
    cross-attention, class -> adaLN): their input channels are stacked, their embeddings summed, and their
    blocks run one after another, each on its own condition."""

    def __init__(self, methods: Mapping[str, Callable[..., ConditioningMethod]], emb_dim: int):
        super().__init__(None, emb_dim)
        self.methods = nn.ModuleDict({name: make(emb_dim=emb_dim) for name, make in methods.items()})
        self.extra_in_channels = sum(method.extra_in_channels for method in self.methods.values())

    def prepare_input(self, x: torch.Tensor, condition: Conditions | None) -> torch.Tensor:
        for name, method in self.methods.items():  # each appends its channels
            x = method.prepare_input(x, None if condition is None else condition[name])
        return x

    def embed(self, temb: torch.Tensor, condition: Conditions | None) -> torch.Tensor:
        for name, method in self.methods.items():  # each adds its term to the embedding
            temb = method.embed(temb, None if condition is None else condition[name])
        return temb

    def make_block(self, channels: int, resolution: int, attention: bool = False, groups: int = 8):
        blocks = {
            name: block
            for name, method in self.methods.items()
            if (block := method.make_block(channels, resolution, attention, groups)) is not None
        }
        return _PerSourceBlocks(blocks) if blocks else None
