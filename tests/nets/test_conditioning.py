"""Conditioning methods on their own: adaLN's block starts as the identity, concat's `embed_pooled`, concat of
a spatial map, and CombinedConditioning (one method per named condition)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from diffusion_lab.condition import Condition, Conditions
from diffusion_lab.nets.conditioning import (
    AdaLNConditioning,
    CombinedConditioning,
    ConcatConditioning,
    ConditioningMethod,
)

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


# --------------------------------------------------------------------------- spatial concat, several conditions


def condition(pooled: torch.Tensor, spatial: torch.Tensor | None = None) -> Condition:
    return Condition(
        tokens=pooled[:, None],
        mask=torch.ones(len(pooled), 1, dtype=torch.bool),
        pooled=pooled,
        spatial=spatial,
    )


def sketch_and_class(b: int = 2) -> Conditions:
    """A 2-channel map (+ present) whose last row is the null (all zero), and a vector condition with
    different pooled vectors."""
    torch.manual_seed(1)
    spatial = torch.cat([torch.rand(b, 2, 4, 4), torch.ones(b, 1, 4, 4)], dim=1)  # (B, 2 + 1, 4, 4)
    spatial[-1] = 0.0
    return Conditions(sketch=condition(torch.randn(b, D), spatial), cls=condition(torch.randn(b, D)))


def test_spatial_concat_stacks_the_map_itself_and_zeros_without_a_condition():
    x = torch.arange(2 * 1 * 4 * 4.0).view(2, 1, 4, 4)
    method = ConcatConditioning(cond_dim=D, emb_dim=64, spatial_channels=2)
    assert method.extra_in_channels == 3 and method.to_map is None  # map + present, nothing to learn
    c = sketch_and_class()["sketch"]
    assert torch.equal(method.prepare_input(x, c), torch.cat([x, c.spatial], dim=1))
    assert torch.equal(method.prepare_input(x, None), torch.cat([x, torch.zeros(2, 3, 4, 4)], dim=1))
    with pytest.raises(ValueError, match="stacks a spatial map, and the condition has none"):
        method.prepare_input(x, condition(torch.randn(2, D)))


class SpyBlock(nn.Module):
    """Records which condition it was handed, and when (the log is shared by every spy)."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, h, emb, c):
        self.log.append((self.name, c))
        return h + len(self.log)


class SpyMethod(ConditioningMethod):
    def __init__(self, name: str, log: list, emb_dim: int):
        super().__init__(emb_dim=emb_dim)
        self.name, self.log = name, log

    def make_block(self, channels: int, resolution: int, attention: bool = False, groups: int = 8):
        return SpyBlock(self.name, self.log)


def test_combined_conditioning_routes_each_name_to_its_method():
    log, conds = [], sketch_and_class()
    combined = CombinedConditioning(
        {
            "cls": lambda emb_dim: SpyMethod("cls", log, emb_dim),
            "plain": lambda emb_dim: ConditioningMethod(emb_dim=emb_dim),  # no block: left out
            "sketch": lambda emb_dim: SpyMethod("sketch", log, emb_dim),
        },
        emb_dim=64,
    )
    block = combined.make_block(8, 7)
    assert list(block.blocks) == ["cls", "sketch"]
    h = torch.zeros(2, 8, 7, 7)
    assert torch.equal(block(h, None, conds), h + 1 + 2)  # one after the other
    assert [(name, c is conds[name]) for name, c in log] == [("cls", True), ("sketch", True)]
    log.clear()
    block(h, None, None)
    assert log == [("cls", None), ("sketch", None)]  # unconditional: None for each
    plain_only = CombinedConditioning(
        {"plain": lambda emb_dim: ConditioningMethod(emb_dim=emb_dim)}, emb_dim=64
    )
    assert plain_only.make_block(8, 7) is None


def test_combined_conditioning_stacks_channels_in_order_and_sums_embeddings():
    torch.manual_seed(0)
    conds, x, temb = sketch_and_class(), torch.randn(2, 1, 4, 4), torch.randn(2, 64)
    combined = CombinedConditioning(
        {
            "sketch": partial(ConcatConditioning, cond_dim=D, spatial_channels=2, embed_pooled=True),
            "cls": partial(ConcatConditioning, cond_dim=D, map_channels=4, map_size=2, embed_pooled=True),
        },
        emb_dim=64,
    )
    sketch, cls = combined.methods["sketch"], combined.methods["cls"]
    assert combined.extra_in_channels == 3 + 4
    with torch.no_grad():
        out = combined.prepare_input(x, conds)
        assert torch.equal(out[:, :1], x) and torch.equal(out[:, 1:4], conds["sketch"].spatial)
        assert torch.equal(out[:, 4:], cls.prepare_input(x, conds["cls"])[:, 1:])
        assert torch.equal(combined.prepare_input(x, None)[:, 1:], torch.zeros(2, 7, 4, 4))
        expected = temb + sketch.mlp(conds["sketch"].pooled) + cls.mlp(conds["cls"].pooled)
        torch.testing.assert_close(combined.embed(temb, conds), expected)
        assert torch.equal(combined.embed(temb, None), temb)
