"""Using a trained model: load it from a checkpoint, pick a sampler, generate labelled images in batches.

The library behind `dlab-sample`, `dlab-eval`, `dlab-viz trajectory` and the validation callbacks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.utils import checks
from diffusion_lab.utils.checkpoints import find_checkpoint, read_checkpoint
from diffusion_lab.utils.images import to_uint8
from diffusion_lab.utils.instantiate import build_module


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_module(ckpt_path: str | Path, device: str | torch.device = "cpu", runs_dir="outputs/train/runs"):
    """(module with the EMA weights, eval mode, on `device`; the checkpoint's path).

    The module is rebuilt from the run config stored in the checkpoint; the EMA callback stores the
    averaged weights as the checkpoint's `state_dict`.
    """
    path = find_checkpoint(str(ckpt_path), runs_dir)
    checkpoint = read_checkpoint(path)
    if not checkpoint.get("run_config"):
        raise CheckpointError(
            f"{path} holds no run_config: it was not written by dlab-train, so it cannot be rebuilt. "
            "Pass a checkpoint from a dlab-train run folder."
        )
    bad = [name for name, value in checkpoint["state_dict"].items() if not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite weights ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}): the run "
            "diverged before it was saved. Use an earlier checkpoint or retrain with a lower optimizer.lr."
        )
    module = build_module(OmegaConf.create(checkpoint["run_config"]))
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["run_config"]
    return module.to(device).eval(), path


def cycle(items: torch.Tensor | list[str], n: int) -> torch.Tensor | list[str]:
    """`items` repeated to length `n`: labels stay a tensor, prompts a list."""
    repeats = (n + len(items) - 1) // len(items)
    return items.repeat(repeats)[:n] if torch.is_tensor(items) else (list(items) * repeats)[:n]


def sampler_for(module, sampler_cfg: DictConfig | None, steps: int | None):
    """The run's own sampler, or one from `conf/sampler/*`, with `steps` steps if given."""
    overrides = {"num_steps": steps} if steps is not None else {}
    if sampler_cfg is None:
        return module.make_sampler(**overrides)
    factory = instantiate(sampler_cfg)
    return factory(schedule=module.schedule, prediction_type=module.hparams.prediction_type, **overrides)


def conditions(cfg: DictConfig, encoder, n: int | None = None) -> tuple[torch.Tensor | list[str], str]:
    """What a command samples: `labels=` for a class model (default: balanced over its classes),
    `prompts=` or `prompts_file=` for a caption model; cycled to `n` (None: one of each). Also returns
    the npz key that records them."""
    prompts, labels = checks.prompts(cfg), checks.class_labels(cfg)
    if encoder.input_key == "caption":
        if labels is not None or prompts is None:
            raise ConfigError(
                "this is a caption model: give prompts='[\"a thick seven\"]' or prompts_file=<txt>"
            )
        return cycle(prompts, n or len(prompts)), "prompts"
    if prompts is not None:
        raise ConfigError("this is a class-conditional model: give labels=[3,7] (or nothing), not prompts")
    if labels is None:
        return encoder.default_inputs(n), "labels"
    return cycle(torch.tensor(labels), n or len(labels)), "labels"


@torch.no_grad()
def generate_batched(
    module,
    inputs: torch.Tensor | list[str],
    guidance: float,
    sampler,
    batch_size: int,
    seed: int,
    progress: bool = True,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """uint8 images (N, C, H, W) for `inputs` (labels or prompts), in batches; batch k is seeded with
    seed + k, so the images do not depend on which command (or callback) asks for them.
    `guidance_interval`: the σ range that is guided (`sample`'s docstring); None guides every step."""
    chunks = []
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    if progress:
        batches = track(batches, description=f"sampling (guidance {guidance:g})")
    for k, chunk in enumerate(batches):
        generator = torch.Generator().manual_seed(seed + k)
        images = module.generate(
            chunk, guidance_scale=guidance, sampler=sampler, generator=generator,
            guidance_interval=guidance_interval,
        )  # fmt: skip
        chunks.append(to_uint8(images).cpu())
    return torch.cat(chunks)
