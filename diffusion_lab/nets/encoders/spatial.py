"""A spatial condition (sketch, semantic map, low-res image, masked image) -> a `Condition` that every
conditioning method can read: the map itself at full resolution for concat, patch tokens from a small
conv encoder for cross-attention, and their mean for adaLN.

The map gets a last "present" channel (1 = given). The null condition (CFG dropout, the unconditional
pass) is an all-zero map with present = 0, so concat sees "no map" and the conv encoder turns it into
learned null tokens (its biases and position embeddings): every method gets a learned null.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders.base import drop_mask


class SpatialEncoder(nn.Module):
    """Maps (B, channels, H, W) of the batch entry `source` -> Condition with `spatial`, tokens and pooled."""

    def __init__(
        self,
        source: str,
        channels: int,
        image_size: int = 28,
        dim: int = 128,
        patch_size: int = 4,
        drop_prob: float = 0.1,
        transform: Mapping | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"condition.patch_size={patch_size} must divide the image size {image_size}")
        self.input_key = source
        # The options of the transform that derives this map from an image (data/spatial.py), kept so
        # sampling and evaluation derive and read maps the way training did.
        self.transform = dict(transform or {})
        self.channels, self.image_size, self.dim, self.drop_prob = channels, image_size, dim, drop_prob
        # Two convs: a 3x3 reads the strokes at full resolution, a patch-sized stride cuts them into tokens.
        self.patches = nn.Sequential(
            nn.Conv2d(channels + 1, dim // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(dim // 2, dim, patch_size, stride=patch_size),
        )
        self.position = nn.Parameter(torch.randn((image_size // patch_size) ** 2, dim) * 0.02)
        # An empty buffer that follows .to(device), for an encoder with no parameters left (see read_by).
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def read_by(self, method) -> None:
        """Keep the patch tokens only if the conditioning `method` reads tokens or their mean (its `reads`):
        concat reads the map alone, and weights that never get a gradient stop DDP (its reducer waits for
        every parameter's gradient)."""
        if not method.reads & {"tokens", "pooled"}:
            del self.patches, self.position
            self.patches = self.position = None

    def forward(self, maps: torch.Tensor, force_drop: torch.Tensor | None = None) -> Condition:
        device = self.present_device
        maps = torch.as_tensor(maps, device=device).float()
        expected = (self.channels, self.image_size, self.image_size)
        if maps.ndim != 4 or tuple(maps.shape[1:]) != expected:
            raise ConfigError(
                f"{self.input_key} maps of shape {tuple(maps.shape)[1:]}: this model's {self.input_key} is "
                f"{expected[0]} channel(s) of {expected[1]}x{expected[2]}"
            )
        present = maps.new_ones(len(maps), 1, *expected[1:])
        spatial = torch.cat([maps, present], dim=1)  # (B, C + 1, H, W)
        drop = drop_mask(len(maps), self.drop_prob, self.training, force_drop, device)
        if drop is not None:
            spatial = spatial.masked_fill(drop[:, None, None, None], 0.0)
        if self.patches is None:  # read as a map only: one empty token, so the Condition keeps its shape
            tokens = spatial.new_zeros(len(maps), 1, self.dim)
        else:
            tokens = self.patches(spatial).flatten(2).transpose(1, 2) + self.position  # (B, L, dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        return Condition(tokens=tokens, mask=mask, pooled=tokens.mean(1), spatial=spatial)

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        empty = torch.zeros(batch_size, self.channels, self.image_size, self.image_size)
        drop = torch.ones(batch_size, dtype=torch.bool)
        return self(empty, force_drop=drop.to(self.present_device))

    @property
    def present_device(self) -> torch.device:
        """Where this encoder lives (a buffer-free encoder whose tokens were dropped still has a device)."""
        return self._device.device
