"""CombinedEncoder: each source's own CFG dropout plus a joint one, at the rates they imply; no dropout
while sampling; a source left out is its null; and the sketch_text recipe trained and sampled with a
scale per condition."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.condition import Conditions
from diffusion_lab.diffusion.samplers import DDIMSampler
from diffusion_lab.errors import ConfigError
from diffusion_lab.module import encoder_inputs
from diffusion_lab.nets.encoders import ClassEncoder, CombinedEncoder, SpatialEncoder
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import CAPTIONS
from tests.nets.encoders.common import assert_same_condition

P_CLASS, P_SKETCH, Q = 0.2, 0.3, 0.1  # own drop rates and the joint one


def combined(joint: float = Q) -> CombinedEncoder:
    torch.manual_seed(0)
    sources = {
        "class": ClassEncoder(num_classes=10, dim=4, drop_prob=P_CLASS),
        "sketch": SpatialEncoder("sketch", channels=1, image_size=4, dim=4, patch_size=2, drop_prob=P_SKETCH),
    }
    return CombinedEncoder(sources, joint_drop_prob=joint, dim=4)


def inputs(n: int) -> dict:
    return {"label": torch.full((n,), 3), "sketch": torch.ones(n, 1, 4, 4)}


def dropped(encoder: CombinedEncoder, conditions: Conditions) -> dict[str, torch.Tensor]:
    """Which rows of each source are its encoder's null() row."""
    null = encoder.null(1)
    return {name: (c.pooled == null[name].pooled).all(-1) for name, c in conditions.items()}


def test_own_and_joint_dropout_reach_their_rates_over_many_batches():
    """A source is dropped by its own mask or the joint one: P = p + q − pq; both together
    p₁p₂(1 − q) + q; the own masks are independent, so the other cells are products too."""
    encoder, n = combined().train(), 20_000
    torch.manual_seed(0)
    batches = [dropped(encoder, encoder(inputs(1000))) for _ in range(n // 1000)]
    d_class = torch.cat([b["class"] for b in batches])
    d_sketch = torch.cat([b["sketch"] for b in batches])

    def close(found: torch.Tensor, p: float) -> None:
        assert abs(found.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n), (
            found.float().mean(),
            p,
        )

    close(d_class, P_CLASS + Q - P_CLASS * Q)
    close(d_sketch, P_SKETCH + Q - P_SKETCH * Q)
    close(d_class & d_sketch, P_CLASS * P_SKETCH * (1 - Q) + Q)
    close(d_class & ~d_sketch, P_CLASS * (1 - P_SKETCH) * (1 - Q))
    close(~d_class & d_sketch, (1 - P_CLASS) * P_SKETCH * (1 - Q))
    close(~d_class & ~d_sketch, (1 - P_CLASS) * (1 - P_SKETCH) * (1 - Q))


def test_eval_mode_drops_nothing_and_force_drop_drops_every_source():
    encoder = combined(joint=1.0).eval()
    assert not any(d.any() for d in dropped(encoder, encoder(inputs(64))).values())
    forced = dropped(encoder, encoder(inputs(3), force_drop=torch.tensor([True, False, True])))
    assert forced["class"].tolist() == forced["sketch"].tolist() == [True, False, True]


def test_a_source_left_out_is_its_null_and_none_at_all_is_an_error():
    encoder = combined().eval()
    c = encoder({"label": torch.tensor([3, 7])})
    null = encoder.sources["sketch"].null(2)
    assert_same_condition(c["sketch"], null)
    assert torch.equal(c["sketch"].spatial, null.spatial)
    assert not dropped(encoder, c)["class"].any()
    with pytest.raises(ConfigError, match=r"no condition given: this model takes label, sketch"):
        encoder({"caption": ["a 3"]})


def test_the_module_hands_a_combined_encoder_each_of_its_inputs():
    encoder, batch = combined(), {"image": torch.zeros(2, 1, 4, 4), **inputs(2), "caption": CAPTIONS[:2]}
    assert encoder.input_key == ("label", "sketch")
    assert set(encoder_inputs(encoder, batch)) == {"label", "sketch"}


def test_sketch_text_trains_and_samples_with_a_scale_per_condition(compose_cfg):
    """The recipe builds from its configs, trains a step, and samples in one forward of 3 passes."""
    cfg = compose_cfg("condition=sketch_text", "conditioning=sketch_text", "model=unet_tiny")
    torch.manual_seed(0)
    module = build_module(cfg)
    batch = {
        "image": torch.rand(2, 1, 28, 28) * 2 - 1,
        "sketch": torch.rand(2, 1, 28, 28),
        "caption": CAPTIONS[:2],
    }
    optimizer = module.build_optimizer()
    loss = module.diffusion_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    seen = []
    module.net.register_forward_hook(lambda net, args, out: seen.append(args[0].shape[0]))
    sampler = DDIMSampler(module.schedule, num_steps=2)
    inputs = {"sketch": batch["sketch"], "caption": CAPTIONS[:2]}
    images = module.generate(inputs, {"sketch": 1.5, "text": 3.0}, sampler=sampler)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    assert seen == [3 * 2] * 2  # ∅, sketch, sketch + text: stacked, one forward per step
    assert module.encoder.training  # generate leaves the encoder as it found it
