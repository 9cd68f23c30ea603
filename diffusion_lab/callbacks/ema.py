"""EMA of the weights, on top of Lightning's `EMAWeightAveraging`.

Lightning swaps the EMA weights in for validation, saves them as the checkpoint's `state_dict`
(so sampling from a checkpoint uses them) and restores both copies on resume. We only add a
warmup of the decay: with a fixed 0.999 the average of a 15-minute run is still mostly the
random initialisation.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class WarmupEMA(EMAWeightAveraging):
    """EMA with decay min(decay, (1 + n) / (10 + n)) after n updates (as in timm / diffusers)."""

    def __init__(self, decay: float = 0.999, **kwargs):
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = self._warmup_avg_fn(decay)

    @staticmethod
    def _warmup_avg_fn(decay: float):
        @torch.no_grad()
        def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
            if not averaged.is_floating_point():
                return current  # integer buffers (e.g. a text encoder's position ids) are copied
            n = float(num_averaged)
            d = min(decay, (1.0 + n) / (10.0 + n))
            return averaged.lerp(current, 1.0 - d)

        return avg_fn
