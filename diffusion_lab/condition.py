"""What the network is told: `Condition` (one source, returned by every condition encoder and read by
every conditioning method), `Conditions` (several named sources at once), and `cycle`, which stretches
what an encoder reads (labels, prompts or maps) to a sample count for every layer that asks for samples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Condition:
    """What the network is told about each sample.

    tokens:  (B, L, D) sequence read by cross-attention.
    mask:    (B, L) bool, True where a token is real (False for padding).
    pooled:  (B, D) one vector per sample, read by concat and AdaLN.
    spatial: (B, C + 1, H, W) or None: a spatial condition's map at full resolution, read by concat, with
             a last "present" channel (1 where the condition is given, 0 for the null condition).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    spatial: torch.Tensor | None = None

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
            tokens.append(F.pad(c.tokens, (0, 0, 0, pad)))
            masks.append(F.pad(c.mask, (0, pad), value=False))
        spatial = None if conditions[0].spatial is None else torch.cat([c.spatial for c in conditions])
        pooled = torch.cat([c.pooled for c in conditions])
        return Condition(tokens=torch.cat(tokens), mask=torch.cat(masks), pooled=pooled, spatial=spatial)

    def repeat_interleave(self, repeats: int) -> Condition:
        """Each condition `repeats` times in a row (several samples per prompt)."""
        spatial = None if self.spatial is None else self.spatial.repeat_interleave(repeats, 0)
        return Condition(
            tokens=self.tokens.repeat_interleave(repeats, 0),
            mask=self.mask.repeat_interleave(repeats, 0),
            pooled=self.pooled.repeat_interleave(repeats, 0),
            spatial=spatial,
        )


class Conditions(dict):
    """Several named conditions of one batch (e.g. {"sketch": ..., "text": ...}), each read by its own
    conditioning method. Built by `CombinedEncoder`; stacks and repeats like a single `Condition`."""

    @property
    def batch_size(self) -> int:
        return next(iter(self.values())).batch_size

    @staticmethod
    def cat(conditions: list[Conditions]) -> Conditions:
        return Conditions({name: Condition.cat([c[name] for c in conditions]) for name in conditions[0]})

    def repeat_interleave(self, repeats: int) -> Conditions:
        return Conditions({name: c.repeat_interleave(repeats) for name, c in self.items()})

    def keeping(self, null: Conditions, names: Iterable[str]) -> Conditions:
        """These conditions for `names` and the null condition for every other source (one guidance pass)."""
        names = set(names)
        return Conditions({name: c if name in names else null[name] for name, c in self.items()})


def stack(conditions: list[Condition | Conditions]) -> Condition | Conditions:
    """`Condition.cat` or `Conditions.cat`, whichever these are."""
    return type(conditions[0]).cat(conditions)


def cycle(items: torch.Tensor | list | Mapping, n: int) -> torch.Tensor | list | dict:
    """`items` repeated to length `n` along the first axis: labels and maps stay tensors, prompts (or
    caption rows) a list, and a mapping of several sources is cycled source by source."""
    if isinstance(items, Mapping):
        return {key: cycle(value, n) for key, value in items.items()}
    repeats = (n + len(items) - 1) // len(items)
    if torch.is_tensor(items):
        return items.repeat(repeats, *[1] * (items.ndim - 1))[:n]
    return (list(items) * repeats)[:n]


def repeat_rows(items: torch.Tensor | list | Mapping, repeats: int):
    """Each sample of `items` `repeats` times in a row (a tensor along its first axis; a mapping per source)."""
    if isinstance(items, Mapping):
        return {key: repeat_rows(value, repeats) for key, value in items.items()}
    if torch.is_tensor(items):
        return items.repeat_interleave(repeats, dim=0)
    return [item for item in items for _ in range(repeats)]


def take_rows(items: torch.Tensor | list | Mapping, start: int, stop: int):
    """Samples `start:stop` of what an encoder reads: a tensor or list slice, or a mapping's slices."""
    if isinstance(items, Mapping):
        return {key: value[start:stop] for key, value in items.items()}
    return items[start:stop]


def count(items: torch.Tensor | list | Mapping) -> int:
    """How many samples `items` holds (every source of a mapping holds as many)."""
    return len(next(iter(items.values()))) if isinstance(items, Mapping) else len(items)
