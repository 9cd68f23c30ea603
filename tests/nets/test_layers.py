"""Layers: a fresh adaLN-Zero block is exactly the identity."""

from __future__ import annotations

import torch

from diffusion_lab.nets.layers import AdaLNZeroBlock


def test_fresh_adaln_zero_block_is_identity():
    torch.manual_seed(0)
    block = AdaLNZeroBlock(32, emb_dim=64)
    h, c = torch.randn(3, 32, 7, 7), torch.randn(3, 64)
    assert torch.equal(block(h, c), h)
    with torch.no_grad():
        block.modulation.weight.normal_(std=0.1)
    assert not torch.allclose(block(h, c), h)  # the identity above came from the zero init, not a bug
