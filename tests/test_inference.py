"""The sampling path below the commands: which sampler a command or callback gets, what a checkpoint is rebuilt
as, seeded batches, the guidance a checkpoint names, and the device."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.inference import (
    DEFAULT_GUIDANCE,
    generate_batched,
    guidance_for,
    load_guidance_model,
    load_module,
    pick_device,
    resolve_sampler,
)
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


def save_run(cfg, folder, steps=(), seed=0) -> None:
    """A run folder holding checkpoints/step_<k>.ckpt for each k, as ModelCheckpoint names them. The weights
    are moved off their initialisation (zero-initialised output layers would make every model alike)."""
    torch.manual_seed(seed)
    state = {k: v + 0.05 * torch.randn_like(v) if k.startswith("net.") else v
             for k, v in build_module(cfg).state_dict().items()}  # fmt: skip
    (folder / "checkpoints").mkdir(parents=True)
    for step in steps:
        run_config = OmegaConf.to_container(cfg, resolve=True)
        record = {"run_config": run_config, "state_dict": state, "global_step": step}
        torch.save(record, folder / "checkpoints" / f"step_{step:07d}.ckpt")


def test_autoguidance_takes_a_step_of_the_same_run_and_checks_it_is_the_same_task(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny")
    save_run(cfg, tmp_path / "run", steps=(4, 8))
    module, path = load_module(tmp_path / "run" / "checkpoints" / "step_0000008.ckpt")
    weak, weak_path = load_guidance_model(4, module, path, "cpu")
    assert weak_path.name == "step_0000004.ckpt" and weak.checkpoint_step == 4
    with pytest.raises(
        CheckpointError, match=r"guidance_model=5: .* no checkpoint at step 5; its steps are 4, 8"
    ):
        load_guidance_model(5, module, path, "cpu")
    save_run(compose_cfg("debug=tiny", "schedule=linear"), tmp_path / "other", steps=(4,))
    with pytest.raises(ConfigError, match="its schedule .* differs from the model's"):
        load_guidance_model(str(tmp_path / "other"), module, path, "cpu")
    save_run(compose_cfg("debug=tiny", "prediction=epsilon"), tmp_path / "eps", steps=(4,))
    with pytest.raises(ConfigError, match="its prediction"):
        load_guidance_model(str(tmp_path / "eps"), module, path, "cpu")


def test_autoguided_generation_differs_from_cfg_and_from_the_model_alone(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny")
    save_run(cfg, tmp_path / "a", steps=(8,), seed=0)
    save_run(cfg, tmp_path / "b", steps=(8,), seed=1)
    module, _ = load_module(tmp_path / "a")
    weak, _ = load_module(tmp_path / "b")

    def draw(scale, guidance_model=None):
        sampler = resolve_sampler(module, None, 3)
        generator = torch.Generator().manual_seed(0)
        return module.generate(torch.tensor([3, 7]), scale, sampler, generator, guidance_model=guidance_model)

    assert torch.equal(draw(1.0, weak), draw(1.0))  # s = 1: the model alone, as with CFG
    assert torch.allclose(draw(3.0, module), draw(1.0), atol=1e-5)  # guided against itself: D1 - D0 = 0
    assert not torch.allclose(draw(2.0, weak), draw(2.0))  # guided against another model, not the null
    assert not torch.allclose(draw(2.0, weak), draw(1.0))


# ---------------------------------------------------------------------------------------------- batches


class NoiseModule:
    """Stands in for DiffusionModule.generate: each image is the first draw of the batch's generator, so
    two images are equal exactly when their batches were seeded alike."""

    def __init__(self, run_config: dict | None = None):
        self.run_config = run_config

    def generate(
        self,
        inputs,
        guidance_scale,
        sampler,
        generator,
        guidance_interval=None,
        guidance_form="nested",
        guidance_model=None,
    ):
        return torch.rand(len(inputs), 1, 4, 4, generator=generator) * 2 - 1  # (B, 1, 4, 4) in [-1, 1]


def batches(seed: int, n: int = 40, batch_size: int = 10) -> list[bytes]:
    images = generate_batched(NoiseModule(), torch.zeros(n), 1.0, None, batch_size, seed, progress=False)
    return [chunk.numpy().tobytes() for chunk in images.split(batch_size)]


# ---------------------------------------------------------------------------------------------- seeds


def test_no_two_batches_of_a_run_share_noise():
    drawn = batches(seed=0)
    assert len(set(drawn)) == len(drawn) == 4


def test_two_seeds_share_no_batch():
    """With batch k seeded `seed + k`, seed 1's first batch was seed 0's second."""
    seen = [b for seed in range(4) for b in batches(seed)]
    assert len(set(seen)) == len(seen) == 16


def test_an_image_does_not_depend_on_which_command_asks():
    # The same (seed, batch size) gives the same images, with or without a progress bar (commands show
    # one, the validation callbacks do not), and the first batches do not depend on how many follow.
    shown = generate_batched(NoiseModule(), torch.zeros(20), 1.0, None, 10, 5, progress=True)
    assert torch.equal(
        shown, generate_batched(NoiseModule(), torch.zeros(20), 1.0, None, 10, 5, progress=False)
    )
    assert torch.equal(shown, generate_batched(NoiseModule(), torch.zeros(40), 1.0, None, 10, 5, False)[:20])


# ---------------------------------------------------------------------------------------------- guidance


def test_guidance_asked_for_wins_over_the_runs_own():
    assert guidance_for(NoiseModule({"guidance": 1.35}), [1.0, 3.0]) == ([1.0, 3.0], "guidance 1, 3")


def test_without_guidance_the_checkpoint_names_its_own():
    assert guidance_for(NoiseModule({"guidance": 1.35}), None) == ([1.35], "guidance 1.35 (the run's own)")


def test_a_checkpoint_that_names_no_scale_gets_the_documented_default():
    scales, words = guidance_for(NoiseModule({"seed": 0}), None)
    assert scales == [DEFAULT_GUIDANCE] == [1.6]  # conf/train.yaml's default, the README's advice
    assert words == "guidance 1.6 (the default: the run names no scale)"


@pytest.mark.parametrize(
    ("experiment", "scale"),
    [("mnist_cpu", 1.6), ("mnist_best", 1.35), ("mnist_text_concat", 3.0), ("mnist_gpu", DEFAULT_GUIDANCE)],
)
def test_each_recipe_names_the_scale_it_samples_best_at(compose_cfg, experiment, scale):
    assert compose_cfg(f"experiment={experiment}").guidance == scale


# ---------------------------------------------------------------------------------------------- device


def test_a_device_this_machine_lacks_is_one_line_naming_device():
    with pytest.raises(ConfigError, match=r"^device='gpu': expected cpu, cuda, cuda:<index> or auto$"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda: this machine has no GPU"):
            pick_device("cuda")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"^device=cuda:{count}: this machine has {count} GPU"):
            pick_device(f"cuda:{count}")
