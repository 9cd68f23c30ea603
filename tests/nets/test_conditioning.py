"""Conditioning methods on their own: adaLN's block starts as the identity, concat's `embed_pooled`."""

from __future__ import annotations

import torch

from diffusion_lab.condition import Condition
from diffusion_lab.nets.conditioning import AdaLNConditioning, ConcatConditioning

D = 32  # the condition's width


def test_fresh_adaln_block_is_identity():
    torch.manual_seed(0)
    h, c = torch.randn(3, 32, 7, 7), torch.randn(3, 64)
    block = AdaLNConditioning(cond_dim=D, emb_dim=64).make_block(32, 7)  # what the net inserts
    assert torch.equal(block(h, c, None), h)


def test_embed_pooled_adds_the_condition_to_the_time_embedding():
    """concat's `embed_pooled`: temb + MLP(pooled), as adaLN's embedding; off, concat has no MLP (old
    checkpoints load) and leaves the time embedding alone."""
    torch.manual_seed(0)
    pooled = torch.randn(4, D)
    c = Condition(tokens=pooled[:, None], mask=torch.ones(4, 1, dtype=torch.bool), pooled=pooled)
    temb = torch.randn(4, 64)
    plain = ConcatConditioning(cond_dim=D, emb_dim=64)
    assert plain.mlp is None and torch.equal(plain.embed(temb, c), temb)
    assert not any(k.startswith("mlp.") for k in plain.state_dict())
    both = ConcatConditioning(cond_dim=D, emb_dim=64, embed_pooled=True)
    adaln = AdaLNConditioning(cond_dim=D, emb_dim=64)
    adaln.mlp.load_state_dict(both.mlp.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(both.embed(temb, c), temb + both.mlp(c.pooled))
        torch.testing.assert_close(both.embed(temb, c), adaln.embed(temb, c))
        assert torch.equal(both.embed(temb, None), temb)  # unconditional: the time embedding alone
