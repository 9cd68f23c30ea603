"""The frozen text encoders' caption cache: same Conditions as without it, bounded, never stale or saved."""

from __future__ import annotations

import copy

import torch

from diffusion_lab.nets.encoders import HFTextEncoder
from tests.conftest import CAPTIONS
from tests.nets.encoders.common import assert_same_condition, tiny_clip


def _count_backbone_captions(enc: HFTextEncoder) -> list[int]:
    """How many captions each backbone call encodes, appended as it runs."""
    seen = []
    enc.backbone.register_forward_pre_hook(
        lambda m, a, kw: seen.append(len(kw["input_ids"])), with_kwargs=True
    )
    return seen


def test_frozen_encoder_caches_backbone_states_per_caption():
    torch.manual_seed(0)
    cached = tiny_clip(dim=16, drop_prob=0.0).eval()
    uncached = tiny_clip(dim=16, drop_prob=0.0, cache_size=0).eval()
    uncached.load_state_dict(cached.state_dict())
    seen = _count_backbone_captions(cached)
    for _ in range(2):  # the second call runs no backbone at all
        assert_same_condition(cached(CAPTIONS), uncached(CAPTIONS))
    mixed = [CAPTIONS[2], "a new caption", CAPTIONS[0], CAPTIONS[2]]
    got, want = cached(mixed), uncached(mixed)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-6, rtol=1e-6)  # batched apart: ~ulp
    assert seen == [4, 1]  # only the new caption ran, once
    states = cached.cache.states
    assert len(states) == 5 and states[CAPTIONS[2]].shape == (int(got.mask[0].sum()), 32)
    assert not any("cache" in k for k in cached.state_dict())  # never saved in checkpoints


def test_cache_is_bounded_and_emptied_when_the_weights_may_change():
    enc = tiny_clip(dim=16, drop_prob=0.0, cache_size=2).eval()
    seen = _count_backbone_captions(enc)
    enc(CAPTIONS)
    enc(CAPTIONS)
    assert list(enc.cache.states) == CAPTIONS[:2]  # full: keeps the first two, adds no more
    assert seen == [4, 2]
    assert not copy.deepcopy(enc).cache.states and enc.cache.states  # EMA's deepcopy starts without it
    enc.to("cpu")  # any .to() / .half(): states from another device or dtype are stale
    assert not enc.cache.states
    enc(CAPTIONS)
    enc.load_state_dict(enc.state_dict())
    assert not enc.cache.states
    unfrozen = tiny_clip(dim=16, freeze=False)
    unfrozen(CAPTIONS)
    assert not unfrozen.cache.states  # a backbone that trains changes every step: nothing to cache
