"""LearnedTextEncoder and its WordTokenizer: stable hashed ids, padding, training gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import LearnedTextEncoder, WordTokenizer
from tests.conftest import CAPTIONS


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
