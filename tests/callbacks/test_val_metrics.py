"""Validation metrics of a spatial model: the maps of held-out test digits, and each condition's fidelity
beside FID and accuracy (the FID path itself is checked end to end in tests/commands/test_evaluate.py)."""

from __future__ import annotations

import torch

from diffusion_lab.callbacks.val_metrics import GenerativeMetrics
from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.utils.images import to_model_range
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import DATA_DIR


class RecordingEvaluator:
    """The evaluator's interface: records the digits each call is scored against."""

    def evaluate(self, images, labels) -> dict:
        self.labels = labels
        return {"fid": 3.0, "kid_mean": 0.1, "accuracy": 0.5, "fid_real_floor": 1.0, "unlogged": 0.0}


def test_a_sketch_model_is_scored_on_held_out_sketches_with_their_stroke_f1(compose_cfg):
    module = build_module(compose_cfg("condition=sketch", "model=unet_tiny")).eval()
    callback = GenerativeMetrics(cache_dir="unused", data_dir=str(DATA_DIR), n=6, num_steps=1)
    callback.evaluator = RecordingEvaluator()
    scores = callback._score(module)
    images, labels = load_split(DATA_DIR, train=False)
    assert torch.equal(callback.evaluator.labels, labels[:6])  # the digit each sketch came from
    assert torch.equal(callback.targets.inputs, spatial.sketch(to_model_range(images[:6])))
    assert set(scores) == {"fid", "kid_mean", "accuracy", "fid_real_floor", "stroke_f1"}
    assert 0.0 <= scores["stroke_f1"] < 0.5  # an untrained model's samples are far from their sketches
    first = callback.targets
    callback._score(module)
    assert callback.targets is first  # the same targets at every validation
