"""The sampling path's choices: which sampler a command or callback gets, and what a checkpoint is rebuilt as."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from diffusion_lab.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.inference import load_module, resolve_sampler
from diffusion_lab.utils.instantiate import build_module

# ---------------------------------------------------------------------------------------------- sampler


def trained_with(factory) -> SimpleNamespace:
    """The three things `resolve_sampler` reads of a module: its sampler partial, schedule, prediction type."""
    schedule = NoiseSchedule(num_timesteps=100)
    return SimpleNamespace(
        sampler_factory=factory, schedule=schedule, hparams=SimpleNamespace(prediction_type="v_prediction")
    )


def test_without_a_factory_or_steps_the_run_samples_with_its_own_sampler():
    module = trained_with(partial(DDIMSampler, num_steps=10, spacing="trailing"))
    sampler = resolve_sampler(module)
    assert type(sampler) is DDIMSampler and sampler.prediction_type == "v_prediction"
    assert sampler.timesteps.tolist() == list(range(99, 0, -10))  # T = 100, 10 trailing steps


def test_steps_change_only_the_step_count_of_the_runs_sampler():
    module = trained_with(partial(DDIMSampler, num_steps=10, spacing="trailing", eta=1.0))
    sampler = resolve_sampler(module, None, 4)
    assert type(sampler) is DDIMSampler and sampler.eta == 1.0 and sampler.spacing == "trailing"
    assert sampler.timesteps.tolist() == [99, 74, 49, 24]


def test_a_named_sampler_replaces_the_runs_own_on_the_same_schedule():
    module = trained_with(partial(DDIMSampler, num_steps=10))
    sampler = resolve_sampler(module, partial(DPMSolverPP2MSampler, spacing="leading"), 5)
    assert type(sampler) is DPMSolverPP2MSampler and sampler.prediction_type == "v_prediction"
    assert sampler.timesteps.tolist() == [80, 60, 40, 20, 0]  # leading: r = 100 // 5
    assert sampler.alphas_cumprod == module.schedule.alphas_cumprod_f64.tolist()


def test_a_sampler_without_steps_keeps_its_own_count():
    sampler = resolve_sampler(trained_with(partial(DDIMSampler)), partial(DDPMSampler))
    assert len(sampler.timesteps) == 100  # DDPM's own: every training step


# ---------------------------------------------------------------------------------------------- loading


def test_a_checkpoint_is_rebuilt_for_sampling_only_with_its_ema_weights(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny")
    trained = build_module(cfg).eval()
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["optimizer"]["_target_"] = "no.such.Optimizer"  # never built when sampling
    path = tmp_path / "run.ckpt"
    torch.save({"run_config": run_config, "state_dict": trained.state_dict()}, path)

    module, found = load_module(path)
    assert found == path and not module.training
    assert module.optimizer_factory is None and module.lr_scheduler_factory is None
    assert module.run_config == run_config

    def draw(m):
        generator = torch.Generator().manual_seed(0)
        return m.generate(torch.tensor([3, 7]), 2.0, resolve_sampler(m, None, 2), generator)

    assert torch.equal(draw(module), draw(trained))  # the same weights: the same images for one seed
