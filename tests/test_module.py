"""DiffusionModule: the LR schedule spans the run unless the config fixes its length; the loss of a zero net is
the weighted target energy (closed form)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.samplers import DDIMSampler
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.module import DiffusionModule, fixed_total_steps
from diffusion_lab.nets.encoders import ClassEncoder
from diffusion_lab.utils.lr import warmup_cosine


def schedule_of(optimizer, total_steps, warmup_steps=0):
    """Stands in for an LR schedule: returns the length it was given."""
    return {"total_steps": total_steps}


@pytest.mark.parametrize(
    ("factory", "fixed"),
    [
        (partial(warmup_cosine, warmup_steps=200, total_steps=6), 6),
        (partial(warmup_cosine, warmup_steps=200, total_steps=None), None),  # `total_steps: null`
        (partial(warmup_cosine, warmup_steps=200), None),  # the key left out
        (partial(schedule_of), None),
    ],
)
def test_fixed_total_steps_reads_what_the_config_gave(factory, fixed):
    assert fixed_total_steps(factory) == fixed


@pytest.mark.parametrize(("total_steps", "spans"), [(None, 40), (6, 6)])
def test_the_schedule_spans_the_run_unless_its_length_is_fixed(total_steps, spans):
    module = DiffusionModule(
        net=nn.Linear(2, 2), schedule=NoiseSchedule(num_timesteps=10), encoder=nn.Identity(),
        sampler=partial(DDIMSampler, num_steps=5), optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(schedule_of, total_steps=total_steps),
    )  # fmt: skip
    module.trainer = SimpleNamespace(precision="32-true", estimated_stepping_batches=40.0)
    configured = module.configure_optimizers()
    assert configured["lr_scheduler"] == {"scheduler": {"total_steps": spans}, "interval": "step"}


# Known answer: diffusion_loss of a net that outputs 0 is the configured prediction type's weighted
# target energy, derived by hand (closed form), not a second run of the code.
GAMMA = 5.0


def make_module(net, schedule, prediction_type, loss_weighting):
    return DiffusionModule(
        net=net,
        schedule=schedule,
        encoder=ClassEncoder(num_classes=10, dim=4, drop_prob=0.0),
        sampler=partial(DDIMSampler, num_steps=5),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        prediction_type=prediction_type,
        loss_weighting=loss_weighting,
        min_snr_gamma=GAMMA,
    )


class ZeroNet(nn.Module):
    in_channels, image_size = 1, 8

    def forward(self, x_t, t, condition):
        return torch.zeros_like(x_t)


def min_snr_weight(snr, prediction_type):
    """Hang et al. 2023: an x₀-loss weighted min(SNR, γ), expressed on each prediction type's target."""
    clipped = snr.clamp(max=GAMMA)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]


@pytest.mark.parametrize("weighting", ["min_snr", "uniform"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_of_a_zero_net_is_the_weighted_target_energy(prediction_type, weighting):
    """A net that outputs 0 has loss mean_b w(t_b) · mean(target_b²), with t then ε replayed from the same
    generator (diffusion_loss's draw order), ᾱ in float64, target ε / x₀ / v = √ᾱ ε − √(1−ᾱ) x₀, and w the
    configured prediction type's min-SNR weight (1 for uniform)."""
    torch.manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    batch = {"image": x0, "label": torch.randint(0, 10, (16,))}
    schedule = NoiseSchedule("linear", 1000)
    module = make_module(ZeroNet(), schedule, prediction_type, weighting)
    for seed in (0, 1, 2):
        loss = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(seed)).item()

        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (16,), generator=g)
        eps = torch.randn(x0.shape, generator=g).double()
        ab = schedule.alphas_cumprod_f64[t].view(-1, 1, 1, 1)
        target = {
            "epsilon": eps,
            "sample": x0.double(),
            "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0,
        }
        energy = target[prediction_type].pow(2).mean(dim=(1, 2, 3))
        snr = (ab / (1 - ab)).flatten()
        weight = min_snr_weight(snr, prediction_type) if weighting == "min_snr" else torch.ones_like(snr)
        want = (weight * energy).mean().item()
        assert loss == pytest.approx(want, rel=1e-4)
        if weighting == "min_snr" and prediction_type != "epsilon":  # ε's weights would be clearly off
            assert (min_snr_weight(snr, "epsilon") * energy).mean().item() != pytest.approx(want, rel=0.01)
