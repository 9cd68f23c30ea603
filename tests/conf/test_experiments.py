"""The recipe presets compose as documented: the CPU default, the GPU recipe and the best-quality one.
Compose checks only (nothing here needs a GPU); `benchmarks/gpu_run.sh` trains them on a lent GPU."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from diffusion_lab.utils.instantiate import build_module
from tests.conftest import CONF_DIR


def test_make_train_default_is_the_cpu_recipe(compose_cfg):
    default, explicit = compose_cfg(), compose_cfg("experiment=mnist_cpu")
    assert default == explicit
    assert default.trainer.accelerator == "cpu" and default.trainer.precision == "32-true"
    assert default.module.compile is False  # compiling costs minutes on a CPU
    assert default.trainer.max_steps > 0 and default.trainer.check_val_every_n_epoch is None  # step-based
    assert "mnist_cpu" in default.tags or "cpu" in default.tags


def test_gpu_recipe_is_bf16_compiled_and_larger_batch(compose_cfg):
    gpu, cpu = compose_cfg("experiment=mnist_gpu"), compose_cfg()
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed"
    assert gpu.module.compile is True
    assert gpu.data.batch_size > cpu.data.batch_size
    assert gpu.trainer.max_steps > 0 and gpu.trainer.check_val_every_n_epoch is None
    assert build_module(gpu).hparams.compile is True


def test_best_recipe_is_the_default_recipe_scaled_up_on_a_gpu(compose_cfg):
    """mnist_best keeps the default recipe's net and method and trains it on far more images, in fp32
    (measured so, eager): the figures benchmarks/README.md gives for it hold only for that."""
    best, cpu = compose_cfg("experiment=mnist_best"), compose_cfg()
    assert best.trainer.accelerator == "gpu" and best.trainer.precision == "32-true"
    assert best.module.compile is False
    for key in ("model", "conditioning", "schedule", "prediction", "loss", "condition", "sampler"):
        assert best[key] == cpu[key], key
    assert best.data.batch_size == 8 * cpu.data.batch_size
    images = best.trainer.max_steps * best.data.batch_size
    assert images >= 10 * cpu.trainer.max_steps * cpu.data.batch_size
    assert best.callbacks.ema.decay > cpu.callbacks.ema.decay  # a window that grows with the run
    assert "best" in best.tags
    header = (CONF_DIR / "experiment" / "mnist_best.yaml").read_text()
    assert "GPU" in header and "99%" in header  # where, what for
    assert "benchmarks/README.md" in header  # its evidence, kept out of the config
    assert best.guidance == 1.35 and best.guidance in best.callbacks.sample_grid.guidance_scales


def test_best_recipe_on_the_cpu_changes_only_the_device(compose_cfg):
    """The header's `trainer=cpu` runs the same numerics on a machine without a GPU."""
    best = compose_cfg("experiment=mnist_best")
    on_cpu = compose_cfg("experiment=mnist_best", "trainer=cpu")
    assert on_cpu.trainer.accelerator == "cpu" and on_cpu.trainer.precision == best.trainer.precision
    for key in ("model", "data", "optimizer", "lr_scheduler", "callbacks", "module", "seed"):
        assert on_cpu[key] == best[key], key
    assert on_cpu.trainer.max_steps == best.trainer.max_steps


def test_gpu_run_sweep_job_is_the_cpu_recipe_on_a_gpu(compose_cfg):
    """benchmarks/gpu_run.sh trains the CPU recipe in fp32 on a GPU so that its quality transfers to
    `make train`: apart from the device and the grid's own keys, a job must be the default recipe."""
    common = [
        "trainer=gpu", "trainer.precision=32-true", "trainer.val_check_interval=${trainer.max_steps}",
        "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null",
    ]  # fmt: skip
    grid = ["trainer.max_steps=2300", "callbacks.ema.decay=0.99", "condition.drop_prob=0.2"]  # one job
    job, cpu = compose_cfg(*common, *grid), compose_cfg()
    assert job.trainer.accelerator == "gpu" and job.trainer.precision == cpu.trainer.precision == "32-true"
    assert job.callbacks.ema.decay == 0.99 and job.condition.drop_prob == 0.2
    same = ["model", "schedule", "conditioning", "prediction", "loss", "sampler", "optimizer", "lr_scheduler",
            "data", "module", "seed"]  # fmt: skip
    for key in same:
        assert job[key] == cpu[key], key
    assert job.trainer.max_steps == cpu.trainer.max_steps
    build_module(job)


VARIANTS = {  # each experiment here is its base with one other conditioning method
    "mnist_concat": ["mnist_adaln", "mnist_cross_attn"],
    "mnist_text_adaln": ["mnist_text_concat", "mnist_text_cross_attn"],
}


@pytest.mark.parametrize(("base", "variants"), VARIANTS.items(), ids=list(VARIANTS))
def test_conditioning_variants_change_only_the_method(compose_cfg, base, variants):
    """A sweep over these experiments compares conditioning methods: nothing else may differ."""

    def rest(cfg):  # unresolved, so the net's `conditioning: ${conditioning}` reads the same
        return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("conditioning", "tags")}

    reference = compose_cfg(f"experiment={base}")
    for variant in variants:
        cfg = compose_cfg(f"experiment={variant}")
        method = variant.removeprefix("mnist_").removeprefix("text_")
        assert cfg.tags == [*reference.tags[:-1], method], variant
        assert cfg.conditioning._target_ != reference.conditioning._target_, variant
        assert rest(cfg) == rest(reference), variant
