"""A frozen text backbone's states per caption, so that after the first epoch only the projection runs."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

Backbone = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> (hidden, mask)


class CaptionCache:
    """caption -> backbone states (n, hidden), trimmed to its n tokens, float32 on the CPU.

    Keeps the first `size` captions and then stops growing, because an epoch revisits every caption in
    turn and LRU or FIFO eviction would then never hit. Copies and pickles (EMA's deepcopy, DDP spawn)
    start empty: the owner clears it whenever its weights may change, so it never travels with them.
    """

    def __init__(self, size: int):
        self.size = size
        self.states: dict[str, torch.Tensor] = {}

    def __getstate__(self):
        return {"size": self.size, "states": {}}

    def clear(self) -> None:
        self.states.clear()

    def __call__(self, captions: list[str], backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
        """`backbone(captions)` as (B, L, hidden) float32 and a (B, L) mask on the CPU, running it only on
        the captions that are not cached yet."""
        fresh = {}
        new = [c for c in dict.fromkeys(captions) if c not in self.states]  # unique, in order
        if new:
            hidden, mask = backbone(new)
            hidden, lengths = hidden.to("cpu", torch.float32), mask.sum(1).tolist()  # one copy per batch
            # clone: a view would keep the whole padded batch alive in the cache
            fresh = {c: h[:n].clone() for c, h, n in zip(new, hidden, lengths, strict=True)}
            room = max(self.size - len(self.states), 0)
            self.states.update(itertools.islice(fresh.items(), room))
        rows = [fresh[c] if c in fresh else self.states[c] for c in captions]
        lengths = torch.tensor([len(r) for r in rows])
        hidden = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, L, hidden)
        return hidden, torch.arange(hidden.shape[1]) < lengths[:, None]  # mask (B, L)
