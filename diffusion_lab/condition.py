"""The `Condition` container that every condition encoder returns and every net reads, and `cycle`, which
stretches what an encoder reads (labels or prompts) to a sample count for every layer that asks for samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Condition:
    """What the network is told about each sample.

    tokens: (B, L, D) sequence read by cross-attention.
    mask:   (B, L) bool, True where a token is real (False for padding).
    pooled: (B, D) one vector per sample, read by concat and AdaLN.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.pooled.shape[0]

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """Stack conditions along the batch (CFG batches cond and null passes together).

        Token sequences of different lengths are right-padded with masked zeros.
        """
        length = max(c.tokens.shape[1] for c in conditions)
        tokens, masks = [], []
        for c in conditions:
            pad = length - c.tokens.shape[1]
            tokens.append(torch.nn.functional.pad(c.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad), value=False))
        return Condition(
            tokens=torch.cat(tokens), mask=torch.cat(masks), pooled=torch.cat([c.pooled for c in conditions])
        )

    def repeat_interleave(self, repeats: int) -> Condition:
        """Each condition `repeats` times in a row (several samples per prompt)."""
        return Condition(
            tokens=self.tokens.repeat_interleave(repeats, 0),
            mask=self.mask.repeat_interleave(repeats, 0),
            pooled=self.pooled.repeat_interleave(repeats, 0),
        )


def cycle(items: torch.Tensor | list, n: int) -> torch.Tensor | list:
    """`items` repeated to length `n`: labels stay a tensor, prompts (or caption rows) a list."""
    repeats = (n + len(items) - 1) // len(items)
    return items.repeat(repeats)[:n] if torch.is_tensor(items) else (list(items) * repeats)[:n]
