"""Several conditions at once (e.g. a sketch for the shape and a caption for the style): one encoder per
named source, each with its own CFG dropout, plus a joint dropout of all of them.

Training drops each source independently with its own `drop_prob` and all sources together with
`joint_drop_prob`, so every subset of the conditions has a learned null: sampling can guide each source
with its own scale (diffusion/guidance.py). A source's marginal drop rate is p + q − p·q.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffusion_lab.condition import Conditions
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders.base import drop_mask


class CombinedEncoder(nn.Module):
    """{name: encoder} -> `Conditions`; reads the batch entries `input_key` (one per source)."""

    def __init__(
        self, sources: Mapping[str, nn.Module], joint_drop_prob: float = 0.0, dim: int | None = None
    ):
        super().__init__()
        if not sources:
            raise ConfigError("condition.sources is empty: name at least one condition (e.g. sketch, text)")
        self.sources = nn.ModuleDict(dict(sources))
        self.joint_drop_prob = joint_drop_prob
        self.dim = dim  # the shared context width the nets read as ${condition.dim}
        self.input_key = tuple(encoder.input_key for encoder in self.sources.values())

    def forward(self, inputs: Mapping, force_drop: torch.Tensor | None = None) -> Conditions:
        """`inputs` keyed by each source's input_key; a source left out gets its null condition."""
        given = [(name, enc) for name, enc in self.sources.items() if enc.input_key in inputs]
        if not given:
            raise ConfigError(f"no condition given: this model takes {', '.join(self.input_key)}")
        n = len(inputs[given[0][1].input_key])
        device = next(self.parameters()).device
        joint = drop_mask(n, self.joint_drop_prob, self.training, force_drop, device)
        parts = {}
        for name, encoder in self.sources.items():
            if encoder.input_key not in inputs:
                parts[name] = encoder.null(n, device)
                continue
            own = drop_mask(n, encoder.drop_prob, self.training, None, device)
            drop = torch.zeros(n, dtype=torch.bool, device=device)
            for mask in (own, joint):
                drop = drop if mask is None else drop | mask
            parts[name] = encoder(inputs[encoder.input_key], force_drop=drop)
        return Conditions(parts)

    def read_by(self, method) -> None:
        """Tell each source which parts of its condition its own method reads (`CombinedConditioning.methods`)."""
        for name, encoder in self.sources.items():
            if hasattr(encoder, "read_by"):
                encoder.read_by(method.methods[name])

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Conditions:
        return Conditions({name: encoder.null(batch_size, device) for name, encoder in self.sources.items()})
