"""What the encoders share: CFG dropout to the null condition, and the caption encoders' common base."""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffusion_lab.condition import Condition

log = logging.getLogger("diffusion_lab")


def drop_mask(batch_size: int, drop_prob: float, training: bool, force_drop, device) -> torch.Tensor | None:
    """Which samples get the null condition: `force_drop` if given, else Bernoulli(p) in train mode."""
    if force_drop is not None:
        return torch.as_tensor(force_drop, dtype=torch.bool, device=device)
    if training and drop_prob > 0:
        return torch.rand(batch_size, device=device) < drop_prob  # global torch RNG, seeded by the trainer
    return None


class CaptionEncoder(nn.Module):
    """What every caption encoder shares: masked-mean pooling, CFG dropout to a learned null token, and
    the text it reads of a caption longer than its `max_length` tokens (subclasses give `_cuts`)."""

    input_key = "caption"

    def __init__(self, dim: int, drop_prob: float, max_length: int):
        super().__init__()
        self.dim, self.drop_prob, self.max_length = dim, drop_prob, max_length
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)  # learned "no caption"
        self.warned_cut = False  # a long caption is a warning once per encoder, not once per batch

    def seen_text(self, captions: list[str]) -> list[str]:
        """Each caption as far as the model reads it (unchanged when it fits in `max_length` tokens).
        The first caption that does not fit is a warning naming the limit and its length."""
        cuts = self._cuts(list(captions))
        if not self.warned_cut:
            for tokens, seen in cuts:
                if tokens > self.max_length:
                    log.warning(
                        "a caption has %d tokens, more than the text encoder's limit of %d "
                        "(condition.max_length): the model reads only %r (warned once)",
                        tokens, self.max_length, seen,
                    )  # fmt: skip
                    self.warned_cut = True
                    break
        return [seen for _, seen in cuts]

    def _cuts(self, captions: list[str]) -> list[tuple[int, str]]:
        """(tokens of each caption, specials included; the caption cut where the tokenizer cuts it)."""
        raise NotImplementedError

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        null = self.null_token.to(device or self.null_token.device)
        pooled = null.expand(batch_size, -1)  # (B, dim)
        mask = torch.ones(batch_size, 1, dtype=torch.bool, device=null.device)
        return Condition(tokens=pooled[:, None], mask=mask, pooled=pooled)

    def _condition(self, tokens: torch.Tensor, mask: torch.Tensor, force_drop) -> Condition:
        """(B, L, dim) tokens and their (B, L) mask -> Condition, with dropped rows replaced by null()."""
        tokens = tokens.masked_fill(~mask[..., None], 0.0)  # padding carries nothing, whatever the batch
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, dim) masked mean
        drop = drop_mask(len(tokens), self.drop_prob, self.training, force_drop, tokens.device)
        if drop is not None:
            # A dropped row becomes null(): the null token first, every other position masked out.
            null = self.null(len(tokens), tokens.device)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            tokens = torch.where(drop[:, None, None], torch.where(first[..., None], null.tokens, 0.0), tokens)
            mask = torch.where(drop[:, None], first, mask)
            pooled = torch.where(drop[:, None], null.pooled, pooled)
        return Condition(tokens=tokens, mask=mask, pooled=pooled)
