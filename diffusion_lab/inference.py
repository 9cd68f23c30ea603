"""Using a trained model: load it from a checkpoint, pick a sampler, generate labelled images in batches.

The library behind `dlab-sample`, `dlab-eval`, `dlab-viz trajectory` and the validation callbacks. It takes
plain values (a path, labels, prompts, a sampler partial, a step count), never a command's config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.progress import track

from diffusion_lab.condition import count, cycle, take_rows
from diffusion_lab.diffusion.samplers import Sampler
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.nets.encoders import CombinedEncoder, SpatialEncoder
from diffusion_lab.utils import checks
from diffusion_lab.utils.checkpoints import (
    find_checkpoint,
    picked_line,
    read_checkpoint,
    run_dir_of,
    step_checkpoint,
)
from diffusion_lab.utils.images import to_uint8
from diffusion_lab.utils.instantiate import build_sampling_module

log = logging.getLogger("diffusion_lab")


# The scale for a checkpoint whose run names none of its own (saved before runs named it): the default
# recipe's best, as conf/train.yaml's `guidance` (the value runs name it by) is.
DEFAULT_GUIDANCE = 1.6


def pick_device(name: str) -> torch.device:
    """`device=` as a torch device, checked against this machine before anything loads."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r}: expected cpu, cuda, cuda:<index> or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name}: this machine has no GPU that torch can use; use device=cpu or device=auto"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device={name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}; pick one of them or device=auto"
        )
    return device


def load_module(ckpt_path: str | Path, device: str | torch.device = "cpu", runs_dir="outputs/train/runs"):
    """(module with the EMA weights, eval mode, on `device`; the checkpoint's path).

    The module is rebuilt from the run config stored in the checkpoint, with only what sampling needs (no
    optimizer or LR schedule); the EMA callback stores the averaged weights as the checkpoint's `state_dict`.
    """
    path = find_checkpoint(str(ckpt_path), runs_dir)
    log.info(picked_line(str(ckpt_path), path, runs_dir))
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
    module = build_sampling_module(OmegaConf.create(checkpoint["run_config"]))
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["run_config"]
    module.checkpoint_step = checkpoint.get("global_step")  # where in training it was saved (provenance)
    return module.to(device).eval(), path


def load_guidance_model(spec, module, path: Path, device, runs_dir="outputs/train/runs"):
    """(the weaker model autoguidance guides against, its checkpoint) for `guidance_model=`: a .ckpt, a run
    folder, or a whole number, the step of the main checkpoint's own run (`path`) to take. Guiding on the raw
    outputs is exact only when both models share the schedule, prediction type and inputs: checked here."""
    if checks.is_int(spec):
        spec = step_checkpoint(run_dir_of(path), int(spec), "guidance_model")
    weak, weak_path = load_module(spec, device, runs_dir)
    for key in ("schedule", "prediction"):
        mine, theirs = (m.run_config.get(key) for m in (module, weak))
        if mine != theirs:
            raise ConfigError(
                f"guidance_model={spec}: its {key} ({theirs}) differs from the model's ({mine}); autoguidance "
                f"needs the same {key}: pick a checkpoint of a run trained with the same {key}"
            )
    if weak.encoder.input_key != module.encoder.input_key:
        raise ConfigError(
            f"guidance_model={spec} reads {weak.encoder.input_key!r}, the model {module.encoder.input_key!r}: "
            "autoguidance needs a weaker model of the same task (an earlier step, a smaller net)"
        )
    return weak, weak_path


def resolve_sampler(
    module, factory: Callable[..., Sampler] | None = None, steps: int | None = None
) -> Sampler:
    """The sampler to generate with, the one place that decides it (dlab-sample, dlab-eval, dlab-viz and the
    validation callbacks): `factory` (a `conf/sampler/*` partial the command instantiated), else the run's
    own, on the module's schedule and prediction type, with `steps` steps (None: the sampler's own)."""
    overrides = {"num_steps": steps} if steps is not None else {}
    return (factory or module.sampler_factory)(
        schedule=module.schedule, prediction_type=module.hparams.prediction_type, **overrides
    )


def guidance_for(module, asked: list[float] | None) -> tuple[list[float], str]:
    """The scales to sample at: `asked`, else the one the checkpoint's run names as its best (`guidance`
    in conf/train.yaml and conf/experiment/*.yaml), else DEFAULT_GUIDANCE. Also the words that say so,
    for the line that names the checkpoint."""
    if asked is not None:
        return asked, "guidance " + scales_words(asked)
    own = (module.run_config or {}).get("guidance")
    if own is None:
        return [DEFAULT_GUIDANCE], f"guidance {DEFAULT_GUIDANCE:g} (the default: the run names no scale)"
    scales = checks.guidance_scales({"guidance": own})
    return scales, "guidance " + scales_words(scales) + " (the run's own)"


def conditions(
    encoder,
    labels: list[int] | None,
    prompts: list[str] | None,
    n: int | None = None,
    *,
    checkpoint: Path,
    maps: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | list[str] | dict, str]:
    """What a command samples: `labels` for a class model (None: balanced over its classes), `prompts`
    for a caption model, as `checks.class_labels` and `checks.prompts` read them before the model
    loaded, and `maps` ({source: (N, C, H, W)}, read from sketch=/lowres=/... files) for a spatial one;
    for a model with several conditions, a {input key: values} mapping of those given (the others are
    left out: null). Cycled to `n` (None: one of each). Also returns the npz key that records them
    ("conditions" for a mapping). Asking the wrong kind of model names `checkpoint` (`last` may have
    picked a model of another kind) and how to pick another."""
    maps = maps or {}
    takes = {e.input_key for e in spatial_encoders(encoder)}
    unused = sorted(set(maps) - takes)
    if unused:
        raise ConfigError(
            f"{checkpoint}: {unused[0]}= was given, but this model takes no {unused[0]}: it takes "
            f"{_what_it_takes(encoder)}, {OTHER_MODEL}"
        )
    if isinstance(encoder, CombinedEncoder):
        given = {"label": _labels(labels), "caption": prompts, **maps}
        inputs = {key: given[key] for key in encoder.input_key if given.get(key) is not None}
        if not inputs or len(inputs) < sum(v is not None for v in given.values()):
            raise ConfigError(f"{checkpoint}: this model takes {_what_it_takes(encoder)}, {OTHER_MODEL}")
        return cycle(inputs, n or max(count(v) for v in inputs.values())), "conditions"
    if takes:
        (source,) = takes
        if source not in maps or labels is not None or prompts is not None:
            raise ConfigError(
                f"{checkpoint}: this is a {source} model: give {_what_it_takes(encoder)}, {OTHER_MODEL}"
            )
        return cycle(maps[source], n or len(maps[source])), source
    if encoder.input_key == "caption":
        if labels is not None or prompts is None:
            raise ConfigError(
                f"{checkpoint}: this is a caption model: give prompts='[\"a thick seven\"]' or "
                f"prompts_file=<txt>, {OTHER_MODEL}"
            )
        return cycle(prompts, n or len(prompts)), "prompts"
    if prompts is not None:
        raise ConfigError(
            f"{checkpoint}: this is a class-conditional model: give labels=[3,7] (or nothing), not "
            f"prompts, {OTHER_MODEL}"
        )
    if labels is None:
        return encoder.default_inputs(n), "labels"
    with torch.no_grad():
        encoder(torch.tensor(labels))  # the encoder checks they are its classes: here, before any progress
    return cycle(torch.tensor(labels), n or len(labels)), "labels"


OTHER_MODEL = "or pick another model with ckpt_path=<run folder or .ckpt>"
TAKES = {"label": "labels=[3,7]", "caption": "prompts='[\"a thick seven\"]'"}


def _what_it_takes(encoder) -> str:
    """The keys that give `encoder` its conditions, as a user types them."""
    keys = encoder.input_key if isinstance(encoder.input_key, tuple) else (encoder.input_key,)
    spatial = {e.input_key for e in spatial_encoders(encoder)}
    words = [
        f"{key}=<png or folder> (or conditions_from=<image folder>)" if key in spatial else TAKES[key]
        for key in keys
    ]
    return " and/or ".join(words) if len(words) > 1 else words[0]


def _labels(labels: list[int] | None) -> torch.Tensor | None:
    return None if labels is None else torch.tensor(labels)


def scale_words(scale: float | dict[str, float]) -> str:
    """A guidance scale as people write it: `2` or `sketch 1.5, text 3`."""
    if isinstance(scale, dict):
        return ", ".join(f"{name} {s:g}" for name, s in scale.items())
    return f"{scale:g}"


def spatial_encoders(encoder) -> list[SpatialEncoder]:
    """The encoders of `encoder`'s spatial conditions (itself, or those among a combined encoder's sources)."""
    parts = encoder.sources.values() if isinstance(encoder, CombinedEncoder) else [encoder]
    return [part for part in parts if isinstance(part, SpatialEncoder)]


def condition_preview(encoder, inputs, channels: int) -> torch.Tensor | None:
    """The first spatial condition of `inputs` as pictures (N, channels, H, W) in [-1, 1], to show beside
    the samples it conditioned (a sketch's strokes, a region map's regions in grey levels, a low-res image,
    a masked image); None for a model without spatial conditions."""
    spatial = spatial_encoders(encoder)
    if not spatial:
        return None
    source = spatial[0].input_key
    if isinstance(inputs, dict) and source not in inputs:
        return None  # left out of this call (null)
    maps = (inputs[source] if isinstance(inputs, dict) else inputs).float().cpu()
    if source == "sketch":
        picture = maps * 2 - 1  # strokes {0, 1} -> white on black, as the digits
    elif source == "semantic":
        picture = maps.argmax(1, keepdim=True) / max(1, maps.shape[1] - 1) * 2 - 1
    else:  # lowres is an image; inpaint's first channels are the masked image (its last, the mask)
        picture = maps[:, :channels] if source == "inpaint" else maps
    return picture.expand(-1, channels, -1, -1) if picture.shape[1] == 1 else picture


def scales_words(scales: list) -> str:
    """Several scales: `1, 3`, or `sketch 1, text 3; sketch 2, text 3` for per-condition ones."""
    return ("; " if isinstance(scales[0], dict) else ", ").join(scale_words(s) for s in scales)


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch `k` of a run seeded `seed`: a 64-bit hash of the pair (numpy's SeedSequence, as
    `SeedSequence(seed).spawn()` gives child k), so no two (seed, k) pairs share noise; `seed + k` would
    give seed 1's first batch to seed 0's second."""
    return int(np.random.SeedSequence(seed, spawn_key=(k,)).generate_state(1, np.uint64)[0])


@torch.no_grad()
def generate_batched(
    module,
    inputs: torch.Tensor | list[str] | dict,
    guidance: float | dict[str, float],
    sampler,
    batch_size: int,
    seed: int,
    progress: bool = True,
    guidance_interval: tuple[float, float] | None = None,
    guidance_form: str = "nested",
    guidance_model=None,
) -> torch.Tensor:
    """uint8 images (N, C, H, W) for `inputs` (labels, prompts, maps, or a {input key: values} mapping of a
    model with several conditions), in batches; batch k is seeded with
    batch_seed(seed, k), so the images do not depend on which command (or callback) asks for them.
    `guidance_interval`: the σ range that is guided (`sample`'s docstring); None guides every step.
    `guidance_model`: a weaker model to autoguide against (`load_guidance_model`); None: classifier-free."""
    chunks = []
    batches = [take_rows(inputs, i, i + batch_size) for i in range(0, count(inputs), batch_size)]
    if progress:
        batches = track(batches, description=f"sampling (guidance {scale_words(guidance)})")
    for k, chunk in enumerate(batches):
        generator = torch.Generator().manual_seed(batch_seed(seed, k))
        images = module.generate(
            chunk, guidance_scale=guidance, sampler=sampler, generator=generator,
            guidance_interval=guidance_interval, guidance_form=guidance_form, guidance_model=guidance_model,
        )  # fmt: skip
        chunks.append(to_uint8(images).cpu())
    return torch.cat(chunks)
