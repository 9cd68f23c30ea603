"""ConditionalUNet: a U-Net of ADM blocks at MNIST's native 28x28 (levels 28 -> 14 -> 7, no padding).

ADM's scale-shift-norm ResBlocks and attention, but one skip per level (not per block) and upsampling
without a conv: about 0.63x the FLOPs of diffusers' UNet2DModel at the same widths. With
`patch_size=2` (unet_patch2, the default recipe's net) the levels run at 14 -> 7 -> 4 on 2x2 patches.

How the condition enters is delegated to a `ConditioningMethod` (see conditioning.py), so the same
net serves concat, cross-attention and adaLN-Zero; size presets live in conf/model/*.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.nets.conditioning import ConditioningMethod
from diffusion_lab.nets.layers import Downsample, ResBlock, SelfAttention, TimestepEmbedder, upsample, zero_


class _Stage(nn.Module):
    """ResBlock, then self-attention and the method's block where asked; called as stage(h, emb, cond)."""

    def __init__(self, res: ResBlock, attn: nn.Module | None, cond_block: nn.Module | None):
        super().__init__()
        self.res, self.attn, self.cond_block = res, attn, cond_block

    def forward(self, h: torch.Tensor, emb: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.cond_block is not None:
            h = self.cond_block(h, emb, condition)
        return h


class ConditionalUNet(nn.Module):
    def __init__(
        self,
        conditioning: Callable[..., ConditioningMethod],
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (7,),
        groups: int = 8,
        dropout: float = 0.0,
        attention_heads: int = 4,
        patch_size: int = 1,
        channels_last: bool = True,
    ):
        super().__init__()
        channels = [int(c) for c in channels]  # Hydra hands in ListConfig
        attn_res = {int(r) for r in attention_resolutions}
        self.in_channels = in_channels
        self.out_channels = out_channels = out_channels or in_channels
        self.image_size = image_size
        if image_size % patch_size:
            raise ValueError(f"model.patch_size={patch_size} must divide the image size {image_size}")
        # Patch size p folds each p x p patch into channels (pixel_unshuffle) before the first conv and
        # unfolds the output (pixel_shuffle): the first level runs at image_size / p, for ~p^2 fewer FLOPs.
        self.patch_size = p = patch_size
        emb_dim = 4 * channels[0]  # ADM's time_embed_dim = 4 * model_channels
        self.time_embed = TimestepEmbedder(channels[0], emb_dim)
        self.conditioning = method = conditioning(emb_dim=emb_dim)

        def stage(c_in: int, c_out: int, res: int, last: bool, attend: bool = True) -> _Stage:
            # The method's block goes once per level, after that level's last res block.
            attn = SelfAttention(c_out, attention_heads, groups) if attend and res in attn_res else None
            block = method.make_block(c_out, res, attention=res in attn_res, groups=groups) if last else None
            return _Stage(ResBlock(c_in, c_out, emb_dim, groups, dropout), attn, block)

        # ----------------------------------------------------------------- down path: one skip per level
        # (lighter than ADM's skip per block: the up path needs num_res_blocks, not +1, blocks per level)
        self.input_conv = nn.Conv2d(
            (in_channels + method.extra_in_channels) * p * p, channels[0], 3, padding=1
        )
        self.down, self.downsample, skip_ch = nn.ModuleList(), nn.ModuleList(), []
        ch, res = channels[0], image_size // p
        for level, c in enumerate(channels):
            stages = [
                stage(ch if i == 0 else c, c, res, last=i == num_res_blocks - 1)
                for i in range(num_res_blocks)
            ]
            self.down.append(nn.ModuleList(stages))
            ch = c
            skip_ch.append(ch)
            if level < len(channels) - 1:
                self.downsample.append(Downsample(ch))
                res = (res + 1) // 2  # stride 2, padding 1: 28 -> 14 -> 7 -> 4

        # ----------------------------------------------------------------- middle: res, attn, block, res
        self.middle = nn.ModuleList([stage(ch, ch, res, last=True), stage(ch, ch, res, False, attend=False)])

        # ----------------------------------------------------------------- up path
        self.up = nn.ModuleList()
        for c in reversed(channels):
            stages = [
                stage(ch + skip_ch.pop() if i == 0 else c, c, res, last=i == num_res_blocks - 1)
                for i in range(num_res_blocks)
            ]
            self.up.append(nn.ModuleList(stages))
            ch = c
            res = res * 2  # nominal; upsample() takes the true size from the skip

        self.out_norm = nn.GroupNorm(groups, ch)
        self.out_conv = zero_(nn.Conv2d(ch, out_channels * p * p, 3, padding=1))  # a fresh net predicts 0

        # Channels-last (NHWC) feature maps and conv weights: oneDNN and cuDNN convolve NHWC without
        # reordering each tensor to a blocked layout and back (benchmarks/README.md, "Speed"), and
        # attention's (B, HW, C) view of a map is then free. `.to(device)` and `load_state_dict` keep it.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Condition | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) long or float, condition or None -> (B, out_channels, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if condition is not None and condition.batch_size != x.shape[0]:
            raise ValueError(f"condition has batch size {condition.batch_size}, images have {x.shape[0]}")
        emb = self.conditioning.embed(self.time_embed(t), condition)  # (B, emb_dim)
        x = self.conditioning.prepare_input(x, condition).contiguous(memory_format=self.memory_format)
        h = self.input_conv(F.pixel_unshuffle(x, self.patch_size))  # (B, ch0, H/p, W/p)
        skips = []
        for level, stages in enumerate(self.down):
            for stage in stages:
                h = stage(h, emb, condition)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        for stage in self.middle:
            h = stage(h, emb, condition)
        for stages in self.up:
            skip = skips.pop()
            h = torch.cat([upsample(h, skip.shape[-2:]), skip], dim=1)  # e.g. 7 -> 14, 14 -> 28
            for stage in stages:
                h = stage(h, emb, condition)
        out = F.pixel_shuffle(self.out_conv(F.silu(self.out_norm(h))), self.patch_size)
        return out.contiguous()  # NCHW out, whatever the layout inside
