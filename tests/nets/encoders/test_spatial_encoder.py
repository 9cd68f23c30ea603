"""SpatialEncoder: the map with its "present" channel, patch tokens and their mean, the null (a dropped
row), shape errors; and every conditioning method trained one step on every spatial source's config."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import SpatialEncoder
from diffusion_lab.utils.instantiate import build_module
from tests.nets.encoders.common import assert_same_condition


def encoder(**kwargs) -> SpatialEncoder:
    torch.manual_seed(0)
    return SpatialEncoder("sketch", channels=2, image_size=8, dim=16, patch_size=4, **kwargs)


def maps(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 2, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.5  # (n, 2, 8, 8), never 0


def test_tokens_are_patches_pooled_their_mean_and_spatial_the_map_with_a_present_channel():
    c = encoder().eval()(maps())
    assert c.tokens.shape == (3, (8 // 4) ** 2, 16) and c.mask.shape == (3, 4) and c.mask.all()
    torch.testing.assert_close(c.pooled, c.tokens.mean(1))
    assert c.spatial.shape == (3, 3, 8, 8)
    assert torch.equal(c.spatial[:, :2], maps()) and torch.equal(c.spatial[:, 2], torch.ones(3, 8, 8))


def test_a_dropped_row_is_all_zero_present_included_and_equals_null():
    enc = encoder(drop_prob=0.0).eval()
    c = enc(maps(), force_drop=torch.tensor([True, False, True]))
    assert torch.equal(c.spatial[0], torch.zeros(3, 8, 8)) and torch.equal(c.spatial[2], torch.zeros(3, 8, 8))
    assert torch.equal(c.spatial[1, :2], maps()[1]) and (c.spatial[1, 2] == 1).all()
    null = enc.null(3)
    assert_same_condition(enc(maps(), force_drop=torch.ones(3, dtype=torch.bool)), null)
    assert torch.equal(null.spatial, torch.zeros(3, 3, 8, 8))
    for row in (0, 2):  # the dropped rows of a mixed batch are exactly null's rows
        assert torch.equal(c.tokens[row], null.tokens[0]) and torch.equal(c.pooled[row], null.pooled[0])
    assert not torch.equal(c.pooled[1], null.pooled[0])  # a learned null, unlike any given map


def test_drop_prob_drops_in_train_mode_only():
    enc = encoder(drop_prob=1.0)
    assert torch.equal(enc.train()(maps()).spatial, torch.zeros(3, 3, 8, 8))
    assert (enc.eval()(maps()).spatial[:, 2] == 1).all()  # sampling never drops


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 2, 7, 7), (2, 8, 8)])
def test_maps_of_the_wrong_shape_name_the_source_and_the_shape_it_takes(shape):
    with pytest.raises(
        ConfigError, match=r"sketch maps of shape .*this model's sketch is 2 channel\(s\) of 8x8"
    ):
        encoder()(torch.zeros(shape))


def test_a_patch_size_that_does_not_divide_the_image_is_a_config_error():
    with pytest.raises(ConfigError, match=r"condition\.patch_size=3 must divide the image size 8"):
        SpatialEncoder("sketch", channels=1, image_size=8, patch_size=3)


# --------------------------------------------------------------------------- configs: every method x source


@pytest.mark.parametrize("method", ["concat", "concat_embed", "cross_attn", "adaln"])
@pytest.mark.parametrize("source", ["sketch", "semantic", "lowres", "inpaint"])
def test_every_method_trains_a_step_on_every_spatial_source(compose_cfg, source, method):
    """The map reaches the net: concat stacks it (map + present) on the input, so the first conv's weights
    on those channels get a gradient; the other methods read the encoder's tokens or pooled vector, so
    the encoder's convs get one. A fresh net's zero-initialised layers (output conv, adaLN-Zero gates)
    would stop every gradient but the output conv's in the first step, so they start small and random."""
    cfg = compose_cfg(f"condition={source}", f"conditioning={method}", "model=unet_tiny")
    torch.manual_seed(0)
    module = build_module(cfg)
    k = {"sketch": 1, "semantic": 3, "lowres": 1, "inpaint": 2}[source]
    assert isinstance(module.encoder, SpatialEncoder) and module.encoder.channels == k
    stacked = k + 1 if method.startswith("concat") else 0
    assert module.net.conditioning.extra_in_channels == stacked
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    batch = {"image": torch.rand(2, 1, 28, 28) * 2 - 1, source: torch.rand(2, k, 28, 28)}
    optimizer = module.build_optimizer()
    loss = module.diffusion_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    if stacked:
        assert module.net.input_conv.weight.grad[:, 1:].abs().sum() > 0  # the map's and present's channels
    else:
        assert module.encoder.patches[0].weight.grad.abs().sum() > 0
    before = [p.detach().clone() for p in module.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize(
    ("conditioning", "tokens"),
    [
        ("concat", False),
        ("concat_embed", True),
        ("cross_attn", True),
        ("adaln", True),
        ("sketch_text", False),
    ],
)
def test_the_encoder_keeps_patch_tokens_only_for_a_method_that_reads_them(compose_cfg, conditioning, tokens):
    """Plain concat reads the map alone: token weights it never reads would get no gradient and stop DDP."""
    condition = "sketch_text" if conditioning == "sketch_text" else "sketch"
    module = build_module(
        compose_cfg(f"condition={condition}", f"conditioning={conditioning}", "model=unet_tiny")
    )
    sketch = module.encoder.sources["sketch"] if condition == "sketch_text" else module.encoder
    assert (sketch.patches is not None) == tokens
    module.train()
    inputs = {"sketch": torch.rand(2, 1, 28, 28), "caption": ["a thin one", "a wide two"]}
    loss = module.diffusion_loss({"image": torch.zeros(2, 1, 28, 28), **inputs})
    loss.backward()
    unused = [name for name, p in module.named_parameters() if p.grad is None]
    assert unused == []  # every parameter gets a gradient, as DDP requires
