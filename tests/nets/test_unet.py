"""ConditionalUNet x every conditioning method x every condition source: shapes, the condition
reaching the output, the null (CFG) path, learning on real MNIST, torch.compile."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.condition import Condition
from diffusion_lab.data.mnist import load_split
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.nets.conditioning import (
    AdaLNConditioning,
    ConcatConditioning,
    CrossAttnConditioning,
    NoConditioning,
)
from diffusion_lab.nets.encoders import ClassEncoder
from diffusion_lab.nets.unet import ConditionalUNet
from tests.conftest import CAPTIONS
from tests.nets.encoders.common import tiny_clip

D = 32  # context width shared by encoders and nets, as ${condition.dim} does in the configs
METHODS = {
    "none": NoConditioning,
    "concat": ConcatConditioning,
    "concat+embed": functools.partial(ConcatConditioning, embed_pooled=True),  # concat + ADM's embedding
    "cross_attn": CrossAttnConditioning,
    "adaln": AdaLNConditioning,
}


def make_net(method: str, **kw) -> ConditionalUNet:
    size = dict(channels=(16, 32), num_res_blocks=1, attention_resolutions=(14,), attention_heads=2)
    return ConditionalUNet(functools.partial(METHODS[method], cond_dim=D), **{**size, **kw})


@functools.cache
def make_encoder(source: str) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = ClassEncoder(dim=D) if source == "class" else tiny_clip(dim=D)
    return encoder.eval()


def encode(source: str, variant: int = 0) -> Condition:
    """Four conditions; `variant` 1 permutes them, so every sample's condition changes."""
    order = [0, 1, 2, 3] if variant == 0 else [1, 2, 3, 0]
    inputs = torch.tensor([7, 3, 0, 1])[order] if source == "class" else [CAPTIONS[i] for i in order]
    with torch.no_grad():
        return make_encoder(source)(inputs)


def randomize_zero_params(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised parameters (out convs, adaLN modulation, GN biases) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("source", ["class", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_output_shape(method, source):
    net = make_net(method).eval()
    x, t = inputs()
    with torch.no_grad():
        assert net(x, t, encode(source)).shape == (4, 1, 28, 28)
        assert net(x, t.float() + 0.5, encode(source)).shape == (4, 1, 28, 28)  # fractional t
        assert net(x, t, None).shape == (4, 1, 28, 28)  # unconditional


def test_default_net_takes_listconfig_and_keeps_28x28():
    cfg = OmegaConf.create({"channels": [32, 64, 128], "attention_resolutions": [7]})
    net = ConditionalUNet(
        functools.partial(CrossAttnConditioning, cond_dim=D),
        channels=cfg.channels,
        attention_resolutions=cfg.attention_resolutions,
        out_channels=2,
    )
    x, t = inputs(4)
    with torch.no_grad():
        out = net(x, t, encode("class"))
    assert out.shape == (4, 2, 28, 28)
    assert not out.any()  # zero-initialised final conv: a fresh net predicts exactly 0
    # cross-attention sits where self-attention does (7x7: the last down level, middle, first up level)
    assert sum(type(m).__name__ == "CrossAttention" for m in net.modules()) == 3


# --------------------------------------------------------------------------- the condition matters


@pytest.mark.parametrize("source", ["class", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_changing_the_condition_changes_the_output(method, source):
    torch.manual_seed(0)
    net = randomize_zero_params(make_net(method)).eval()
    x, t = inputs()
    with torch.no_grad():
        a, b = net(x, t, encode(source, 0)), net(x, t, encode(source, 1))
    per_sample = (a - b).flatten(1).abs().amax(1)
    if method == "none":
        assert torch.equal(a, b)
    else:
        assert (per_sample > 1e-4).all(), per_sample


@pytest.mark.parametrize("method", ["concat", "concat+embed", "adaln"])
def test_pooled_methods_read_pooled(method):
    torch.manual_seed(0)
    net = randomize_zero_params(make_net(method)).eval()
    x, t = inputs()
    c = encode("text")
    other = Condition(tokens=torch.randn_like(c.tokens), mask=c.mask, pooled=c.pooled)
    with torch.no_grad():
        assert torch.equal(net(x, t, c), net(x, t, other))  # tokens are not read
        assert not torch.allclose(net(x, t, c), net(x, t, Condition(c.tokens, c.mask, c.pooled + 1)))


def test_cross_attention_reads_tokens_and_respects_the_mask():
    torch.manual_seed(0)
    net = randomize_zero_params(make_net("cross_attn")).eval()
    x, t = inputs()
    c = encode("text")
    masked_out = torch.where(c.mask[..., None], c.tokens, torch.randn_like(c.tokens))  # only padding changes
    new_tokens = c.tokens + torch.randn_like(c.tokens)
    with torch.no_grad():
        ref = net(x, t, c)
        torch.testing.assert_close(net(x, t, Condition(masked_out, c.mask, c.pooled)), ref)
        assert not torch.allclose(net(x, t, Condition(new_tokens, c.mask, c.pooled)), ref)
        assert torch.equal(net(x, t, Condition(c.tokens, c.mask, c.pooled + 1)), ref)  # pooled not read


# --------------------------------------------------------------------------- the null (CFG) path


@pytest.mark.parametrize("source", ["class", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_null_condition_batched_with_cond_matches_separate_passes(method, source):
    torch.manual_seed(0)
    net = randomize_zero_params(make_net(method)).eval()
    x, t = inputs()
    cond, null = encode(source), make_encoder(source).null(4, "cpu")
    with torch.no_grad():
        both = net(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, null]))  # CFG's one pass
        sep = torch.cat([net(x, t, cond), net(x, t, null)])
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both, sep, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- learning on real MNIST


@pytest.fixture(scope="module")
def mnist_batch(data_dir):  # conftest: $DLAB_DATA_DIR, default ../shared/data/mnist
    images, labels = load_split(data_dir, train=False)
    return images[:32].float() / 127.5 - 1, labels[:32]  # (32, 1, 28, 28) in [-1, 1]


@pytest.mark.parametrize("method", METHODS)
def test_a_few_adam_steps_lower_the_eps_loss_on_a_fixed_mnist_batch(method, mnist_batch):
    torch.manual_seed(0)
    x0, labels = mnist_batch
    net, encoder = make_net(method), ClassEncoder(dim=D, drop_prob=0.0)
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),))  # fixed: a fair comparison
    x_t = schedule.add_noise(x0, noise, t)
    params = list(net.parameters()) + list(encoder.parameters())
    before = [p.detach().clone() for p in net.conditioning.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)

    def loss_fn():
        return (net(x_t, t, encoder(labels)) - noise).pow(2).mean()

    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < initial, (initial, final)
    # the conditioning path itself learns (gradients reach it once the zero-init out conv has moved)
    changed = [not torch.equal(b, p) for b, p in zip(before, net.conditioning.parameters(), strict=True)]
    assert all(changed), changed


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("method", ["none", "adaln", "cross_attn"])
def test_patch_size_2_is_a_net_on_pixel_unshuffled_images(method):
    """model.patch_size=2 is exactly: fold each 2x2 patch into channels, run the net at 14x14, unfold.
    Checked against a patch_size=1 net on 4-channel 14x14 images that holds the same weights."""
    torch.manual_seed(0)
    patched = randomize_zero_params(make_net(method, patch_size=2, attention_resolutions=(7,)))
    plain = make_net(method, in_channels=4, image_size=14, attention_resolutions=(7,))
    plain.load_state_dict(patched.state_dict())
    x, t = inputs()
    c = encode("class")
    with torch.no_grad():
        expected = torch.nn.functional.pixel_shuffle(
            plain(torch.nn.functional.pixel_unshuffle(x, 2), t, c), 2
        )
        torch.testing.assert_close(patched(x, t, c), expected)
    # the levels run at 14 and 7: the 7x7 attention exists (it would not at 28 -> 14)
    assert sum(type(m).__name__ == "SelfAttention" for m in patched.modules()) == 3


def test_concat_map_is_folded_with_the_image():
    """Concat's label map is made at the image's size and folded with it: 4 x (1 + k) input channels."""
    net = make_net("concat", patch_size=2, attention_resolutions=(7,))
    k = net.conditioning.extra_in_channels
    assert net.input_conv.in_channels == 4 * (1 + k)
    x, t = inputs()
    with torch.no_grad():
        assert net(x, t, encode("class")).shape == (4, 1, 28, 28)


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="model.patch_size=3 must divide the image size 28"):
        make_net("none", patch_size=3)


# --------------------------------------------------------------------------- memory layout


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_matches_nchw(method):
    """The net runs its maps channels-last (a speed choice): same outputs and gradients as NCHW,
    an NCHW output, and the layout survives a state_dict round trip into an NCHW-built net."""
    torch.manual_seed(0)
    fast = randomize_zero_params(make_net(method))
    slow = make_net(method, channels_last=False)
    slow.load_state_dict(fast.state_dict())
    assert fast.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert slow.input_conv.weight.is_contiguous()
    x, t = inputs()
    c = encode("class")
    outs = []
    for net in (fast, slow):
        out = net(x, t, c)
        out.square().mean().backward()
        outs.append(out)
    assert outs[0].is_contiguous()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3, msg=name)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow  # compiles the net: seconds of Inductor work, not a unit test
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break (the Condition dataclass, the level loops, SDPA masks).

    The aot_eager backend traces forward and backward the way inductor does, without inductor's
    C++ codegen, which takes about a minute cold on 2 CPU cores (DLAB_TEST_INDUCTOR=1 runs it too).
    """
    torch.manual_seed(0)
    backend = "inductor" if os.environ.get("DLAB_TEST_INDUCTOR") == "1" else "aot_eager"
    net = randomize_zero_params(make_net("cross_attn"))
    x, t = inputs()
    c = encode("text")
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    out = compiled(x, t, c)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = net(x, t, c)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-3)
