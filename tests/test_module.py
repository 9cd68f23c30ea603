"""DiffusionModule's optimiser wiring: the LR schedule spans the run unless the config fixes its length."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.samplers import DDIMSampler
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.module import DiffusionModule, fixed_total_steps
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
