"""EDM: the preconditioning and Karras σ against closed forms and diffusers, the loss λ(σ)·‖D − x₀‖² by hand,
the module (state_dict unchanged, trains and samples from the real configs) and the config checks."""

import math
import re
from functools import partial

import diffusers  # a [dev] dependency: the reference implementation, tests only
import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.edm import EDMPreconditioned, EDMSchedule, karras_sigmas
from diffusion_lab.diffusion.edm_samplers import HeunSampler
from diffusion_lab.errors import ConfigError
from diffusion_lab.module import DiffusionModule
from diffusion_lab.nets.encoders import ClassEncoder
from diffusion_lab.utils.config_checks import check_run_config
from diffusion_lab.utils.instantiate import build_module

SD = 0.5  # σ_data


# --------------------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------------------


def test_preconditioning_at_known_sigmas():
    """σ = σ_d: c_skip = 1/2, c_out = σ_d/√2, c_in = 1/(σ_d√2); σ = √3 σ_d: 1/4, √3 σ_d/2, 1/(2σ_d);
    c_noise = 250 ln σ; and λ(σ) c_out² = 1 (EDM's loss is uniform on the net's own target)."""
    schedule = EDMSchedule()
    sigma = torch.tensor([SD, math.sqrt(3) * SD, 1e-3, 1e3], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = schedule.preconditioning(sigma)
    torch.testing.assert_close(c_skip[:2], torch.tensor([1 / 2, 1 / 4], dtype=torch.float64))
    torch.testing.assert_close(c_out[:2], torch.tensor([SD / 2**0.5, 3**0.5 * SD / 2], dtype=torch.float64))
    torch.testing.assert_close(c_in[:2], torch.tensor([1 / (SD * 2**0.5), 1 / (2 * SD)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, 250 * sigma.log())
    assert c_skip[2] == pytest.approx(1, abs=1e-5) and c_out[2] == pytest.approx(1e-3, rel=1e-5)  # D ≈ x
    assert c_skip[3] == pytest.approx(0, abs=1e-6) and c_out[3] == pytest.approx(SD, rel=1e-6)  # D ≈ σ_d F
    torch.testing.assert_close(schedule.loss_weight(sigma) * c_out**2, torch.ones_like(sigma))

    ref = diffusers.EDMEulerScheduler(sigma_data=SD)  # the same Table 1 (its ε-type c_out is our sign)
    x, f = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    col = sigma[:, None]
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * f, ref.precondition_outputs(x, f, col))
    torch.testing.assert_close(c_in[:, None] * x, ref.precondition_inputs(x, col))


def test_karras_sigmas_closed_form_and_diffusers():
    s = karras_sigmas(3, 0.002, 80.0, 7.0).tolist()
    middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert s == pytest.approx([80.0, middle, 0.002, 0.0], rel=1e-12)
    assert karras_sigmas(5, 1.0, 5.0, 1.0).tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # ρ = 1: linear
    assert karras_sigmas(1, 0.002, 80.0, 7.0).tolist() == [80.0, 0.0]
    ref = diffusers.EDMEulerScheduler()
    ref.set_timesteps(18)
    torch.testing.assert_close(karras_sigmas(18, 0.002, 80.0, 7.0).float(), ref.sigmas)


# --------------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------------


class ScaleNet(nn.Module):
    """F = k · input, and records what it was given, so D = (c_skip + k c_out c_in) x has a closed form."""

    in_channels, image_size = 1, 8

    def __init__(self, k: float):
        super().__init__()
        self.k, self.inputs, self.weight = k, [], nn.Parameter(torch.zeros(1))

    def forward(self, x, t, condition):
        self.inputs.append((x, t))
        return self.k * x + 0 * self.weight


def edm_module(net, weighting="uniform", gamma=5.0):
    return DiffusionModule(
        net=net, schedule=EDMSchedule(), encoder=ClassEncoder(num_classes=10, dim=4, drop_prob=0.0),
        sampler=partial(HeunSampler, num_steps=3), optimizer=partial(torch.optim.AdamW, lr=1e-3),
        prediction_type="edm", loss_weighting=weighting, min_snr_gamma=gamma,
    )  # fmt: skip


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("k", [0.0, 0.7])
def test_loss_is_the_weighted_distance_of_d_to_x0(k, weighting):
    """ln σ ~ N(−1.2, 1.2²) then n ~ N(0, I) replayed from the same generator; x = x₀ + σ n;
    D = σ_d²/(σ² + σ_d²) x + k σ σ_d/(σ² + σ_d²) x; loss = mean_b w(σ_b) mean((D − x₀)²) with
    w = (σ² + σ_d²)/(σ σ_d)² (uniform) or min(1/σ², γ) (min_snr). The net sees x/√(σ² + σ_d²) and 250 ln σ."""
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1
    net = ScaleNet(k)
    loss = edm_module(net, weighting).diffusion_loss(
        {"image": x0, "label": torch.arange(6)}, generator=torch.Generator().manual_seed(3)
    )

    g = torch.Generator().manual_seed(3)
    sigma = (-1.2 + 1.2 * torch.randn(6, generator=g)).exp().double()
    x = x0.double() + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g).double()
    s = sigma.view(-1, 1, 1, 1)
    d = (SD**2 + k * s * SD) / (s**2 + SD**2) * x
    weight = (
        (sigma**2 + SD**2) / (sigma * SD) ** 2 if weighting == "uniform" else sigma.pow(-2).clamp(max=5.0)
    )
    want = (weight * (d - x0).pow(2).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    (seen_x, seen_t), = net.inputs  # fmt: skip
    torch.testing.assert_close(seen_x.double(), x / (s**2 + SD**2).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen_t.double(), 250 * sigma.log(), rtol=1e-5, atol=1e-4)


def test_the_state_dict_holds_the_net_once_as_before():
    """The preconditioning is not a submodule: an EDM module's keys are a v_prediction module's."""
    module = edm_module(ScaleNet(1.0))
    assert isinstance(module.denoiser(), EDMPreconditioned) and module.denoiser().net is module.net
    keys = set(module.state_dict())
    assert "net.weight" in keys and not any(k.startswith(("schedule.", "denoiser")) for k in keys)
    module.load_state_dict(module.state_dict())  # strict


# --------------------------------------------------------------------------------------------------------
# The real configs
# --------------------------------------------------------------------------------------------------------


def test_a_tiny_edm_model_trains_and_samples_labels_with_guidance(compose_cfg):
    cfg = compose_cfg(
        "schedule=edm", "prediction=edm", "sampler=heun", "model=unet_tiny", "conditioning=adaln"
    )
    assert cfg.module.loss_weighting == "uniform"  # prediction=edm picks EDM's λ(σ)
    check_run_config(cfg)
    torch.manual_seed(0)
    module = build_module(cfg)
    assert isinstance(module.schedule, EDMSchedule) and isinstance(module.sampler, HeunSampler)
    optimizer = module.build_optimizer()
    for _ in range(2):
        batch = {"image": torch.rand(2, 1, 28, 28) * 2 - 1, "label": torch.tensor([3, 7])}
        loss = module.diffusion_loss(batch)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seen = []
    module.net.register_forward_hook(lambda net, args, out: seen.append(args[1]))
    sampler = module.sampler_factory(schedule=module.schedule, prediction_type="edm", num_steps=2)
    images = module.generate(torch.tensor([3, 7]), 2.0, sampler, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    assert images.abs().max() < 1.01  # the last step lands on the clipped D, up to rounding
    sigmas = karras_sigmas(2, 0.002, 80.0, 7.0)[[0, 1, 1]]  # Heun: 3 calls, on the doubled batch (CFG)
    assert [t.shape for t in seen] == [(4,)] * 3
    torch.testing.assert_close(
        torch.stack([t[0] for t in seen]).double(), 250 * sigmas.log(), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["schedule=edm"], "schedule=edm needs prediction=edm"),
        (["prediction=edm"], "prediction=edm (module.prediction_type) needs schedule=edm"),
        (["schedule=edm", "prediction=edm", "sampler=ddim"], "sampler=heun or sampler=dpmpp"),
    ],
)
def test_mismatched_edm_keys_are_one_config_error_before_training(compose_cfg, overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_run_config(compose_cfg(*overrides))
