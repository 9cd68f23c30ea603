"""The one place where images change range: the model works in [-1, 1], files hold uint8, plots [0, 1]."""

from __future__ import annotations

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]; float input is taken to be in [-1, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255] (clamped, rounded); uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → float [0, 1] (clamped), for grids and plots."""
    return images.float().clamp(-1, 1).add(1).div(2)
