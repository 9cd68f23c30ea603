"""Class labels -> a learned embedding per class, with a learned null for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders.base import drop_mask


class ClassEncoder(nn.Module):
    """Label -> learned embedding; index `num_classes` is the learned null (CFG's unconditional)."""

    input_key = "label"

    def __init__(self, num_classes: int = 10, dim: int = 128, drop_prob: float = 0.1):
        super().__init__()
        self.num_classes, self.dim, self.drop_prob = num_classes, dim, drop_prob
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> Condition:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique().tolist()
            raise ConfigError(f"labels={bad}: this model knows the classes 0..{self.num_classes - 1}")
        drop = drop_mask(len(labels), self.drop_prob, self.training, force_drop, labels.device)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self._condition(labels)

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        device = device or self.embedding.weight.device
        return self._condition(torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))

    def default_inputs(self, n: int | None = None) -> torch.Tensor:
        """Labels to sample when none are given: `n` balanced over the classes (None: one of each)."""
        return torch.arange(self.num_classes if n is None else n) % self.num_classes

    def _condition(self, labels: torch.Tensor) -> Condition:
        emb = self.embedding(labels)  # (B, D)
        mask = torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
        return Condition(tokens=emb[:, None], mask=mask, pooled=emb)  # tokens (B, 1, D)
