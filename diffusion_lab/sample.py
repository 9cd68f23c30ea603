"""`dlab-sample`: a checkpoint plus a sampler config -> `samples.npz` and a PNG grid.

A class model samples `labels` (default: balanced over its classes); a caption model samples
`prompts` or the lines of `prompts_file`; a spatial model samples the maps read from `sketch=`,
`semantic=`, `lowres=` or `inpaint=` + `mask=` files, or derived from real images (`conditions_from=`).
A model with several conditions takes any of its keys at once (the others are left out), and
`guidance='{sketch: 1.5, text: 3}'` gives each its own scale. `guidance_model=<ckpt, run folder or a step of
this run>` guides against that weaker model instead of the null condition (autoguidance). Inputs are cycled to `n` images per guidance
scale; without `guidance=` the scale is the one the checkpoint's run names as its best. `samples.npz`
holds every image and every condition given; `samples.png` previews at most PREVIEW_IMAGES of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import save_image

from diffusion_lab.cli import hydra_app
from diffusion_lab.condition import count, cycle, take_rows
from diffusion_lab.data import spatial
from diffusion_lab.data.condition_files import conditions_from, read_condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import (
    condition_preview,
    conditions,
    generate_batched,
    guidance_for,
    load_guidance_model,
    load_module,
    pick_device,
    resolve_sampler,
    spatial_encoders,
)
from diffusion_lab.nets.encoders import CombinedEncoder
from diffusion_lab.utils import checks
from diffusion_lab.utils.images import to_model_range, to_uint8, to_unit

log = logging.getLogger("diffusion_lab")

PREVIEW_IMAGES = 100  # samples.png shows at most this many, so it stays readable at any n


def preview_rows(inputs: list, scales: int) -> list[list[int]]:
    """Which images samples.png shows, as rows of indices into the npz (blocks of len(inputs) images
    per guidance scale): one row per distinct label or prompt, then a block of columns per scale, at
    most PREVIEW_IMAGES images. Every row is full: a row holds as many images per scale as the
    rarest condition has."""
    distinct = list(dict.fromkeys(inputs))[: max(1, PREVIEW_IMAGES // scales)]
    where = {c: [i for i, x in enumerate(inputs) if x == c] for c in distinct}
    fit = PREVIEW_IMAGES // (len(distinct) * scales)
    columns = max(1, min(fit, *(len(w) for w in where.values())))
    n = len(inputs)
    return [[b * n + i for b in range(scales) for i in where[c][:columns]] for c in distinct]


RECORDED_AS = {"label": "labels", "caption": "prompts"}  # npz names of a combined model's inputs


def recorded_inputs(inputs, key: str, scales: int) -> dict[str, np.ndarray]:
    """The npz arrays that record what each image was given: `labels`, `prompts` or a map per source
    (float16, (N, C, H, W)), repeated once per guidance scale like the images."""
    if key == "conditions":
        return {
            name: array
            for input_key, value in inputs.items()
            for name, array in recorded_inputs(value, RECORDED_AS.get(input_key, input_key), scales).items()
        }
    if key == "prompts":
        return {key: np.asarray(list(inputs) * scales)}
    repeated = inputs.repeat(scales, *[1] * (inputs.ndim - 1)).cpu()
    return {key: repeated.numpy() if key == "labels" else repeated.to(torch.float16).numpy()}


def recorded_guidance(scales: list, n: int, form: str) -> dict[str, np.ndarray]:
    """`guidance` (a scale per image), or one `guidance_<name>` per condition and `guidance_form`."""
    if not isinstance(scales[0], dict):
        return {"guidance": np.repeat(np.asarray(scales, dtype=np.float32), n)}
    per_name = {
        f"guidance_{name}": np.repeat(np.asarray([s[name] for s in scales], np.float32), n)
        for name in scales[0]
    }
    return per_name | {"guidance_form": np.asarray(form)}


def spatial_preview(encoder, inputs, images: torch.Tensor, n: int, scales: int) -> torch.Tensor:
    """uint8 tiles (rows, 1 + scales, C, H, W): each of the first rows' condition, then its sample at each scale."""
    shown = min(n, max(1, PREVIEW_IMAGES // (scales + 1)))
    tiles = images[torch.tensor([[b * n + i for b in range(scales)] for i in range(shown)])]
    picture = condition_preview(encoder, take_rows(inputs, 0, shown), images.shape[1])
    return tiles if picture is None else torch.cat([to_uint8(picture)[:, None], tiles], dim=1)


def _text_encoder(encoder):
    """The caption encoder of a caption model, or of a combined model's caption source."""
    if isinstance(encoder, CombinedEncoder):
        return next(e for e in encoder.sources.values() if e.input_key == "caption")
    return encoder


def seen_prompts(encoder, inputs, key: str, scales: int) -> dict[str, np.ndarray]:
    """`prompts_seen`: what the model reads of each prompt, cut to the encoder's token limit (with a
    warning), repeated once per guidance scale; nothing for a model without captions."""
    prompts_read = inputs.get("caption") if key == "conditions" else inputs if key == "prompts" else None
    if prompts_read is None:
        return {}
    return {"prompts_seen": np.asarray(_text_encoder(encoder).seen_text(prompts_read) * scales)}


def write_samples(
    out: Path, encoder, images: torch.Tensor, inputs, key: str, scales: list, interval, form: str, **extra
) -> torch.Tensor:
    """`samples.npz` (uint8 images (N, C, H, W) for `inputs` cycled once per scale, what each was given, the
    scales, the guidance interval, and the `extra` arrays) and its preview `samples.png` in `out`, the files
    dlab-sample (and dlab-demo's download) write; returns the preview's tiles (rows, columns, C, H, W)."""
    n = count(inputs)
    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy(),
        guidance_interval=np.asarray(interval or checks.EVERY_STEP, dtype=np.float32),
        **recorded_guidance(scales, n, form),
        **recorded_inputs(inputs, key, len(scales)),
        **extra,
    )
    if key in ("labels", "prompts"):
        rows = preview_rows(inputs.tolist() if key == "labels" else inputs, len(scales))
        tiles = images[torch.tensor(rows)]  # (conditions, scales · columns, C, H, W)
    else:
        tiles = spatial_preview(encoder, inputs, images, n, len(scales))
    save_image(
        to_unit(to_model_range(tiles.flatten(0, 1))), out / "samples.png", nrow=tiles.shape[1], padding=2
    )
    return tiles


def read_maps(cfg: DictConfig, module) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """({source: maps} from the sketch=/semantic=/lowres=/inpaint= files or derived from conditions_from=,
    the real images of conditions_from= or None), read the way the model's encoders derive their maps."""
    encoders = {e.input_key: e for e in spatial_encoders(module.encoder)}
    size, channels = module.net.image_size, module.net.in_channels
    if cfg.get("mask") is not None and cfg.get("inpaint") is None:
        raise ConfigError("mask= is the inpainting mask; it goes with inpaint=<png or folder>")
    maps = {}
    for key in spatial.SOURCES:  # sketch=, semantic=, lowres=, inpaint=
        if cfg.get(key) is not None:
            options = encoders[key].transform if key in encoders else {}
            mask = cfg.get("mask") if key == "inpaint" else None
            # A key the model does not take stays unread (None): `conditions` names it in its error.
            maps[key] = (
                read_condition(key, cfg[key], size, channels, options, mask) if key in encoders else None
            )
    if cfg.get("conditions_from") is None:
        return maps, None
    sources = {key: e.transform for key, e in encoders.items() if key not in maps}
    images, derived = conditions_from(cfg.conditions_from, sources, size, channels, cfg.seed)
    return maps | derived, images


def run(cfg: DictConfig) -> Path:
    # Every argument is checked before the model is loaded or a file is written.
    n = checks.positive_int(cfg, "n", 100)
    asked = checks.optional_guidance_scales(cfg)
    interval = checks.guidance_interval(cfg)
    form = checks.guidance_form(cfg)
    steps = checks.optional_positive_int(cfg, "steps", 20)
    batch_size = checks.positive_int(cfg, "batch_size", 250)
    seed = checks.non_negative_int(cfg, "seed", 0)
    labels, prompts = checks.class_labels(cfg), checks.prompts(cfg)
    factory = instantiate(cfg.sampler) if cfg.get("sampler") else None  # `sampler=`: a conf/sampler/* partial
    device = pick_device(cfg.device)
    out = checks.writable_dir(cfg.paths.output_dir)

    module, path = load_module(cfg.ckpt_path, device, cfg.paths.train_runs)
    scales, guidance_words = guidance_for(module, asked)
    log.info("sampling from %s at %s", path, guidance_words)
    weak, autoguided = None, {}
    if cfg.get("guidance_model") is not None:  # autoguidance: guided against a weaker model, not the null
        weak, weak_path = load_guidance_model(cfg.guidance_model, module, path, device, cfg.paths.train_runs)
        log.info("autoguidance against %s", weak_path)
        autoguided = {"guidance_model": np.asarray(str(weak_path))}
    maps, real_images = read_maps(cfg, module)
    inputs, key = conditions(module.encoder, labels, prompts, n, checkpoint=path, maps=maps)
    sampler = resolve_sampler(module, factory, steps)

    extra = seen_prompts(module.encoder, inputs, key, len(scales))  # its warning comes before sampling
    images = torch.cat([
        generate_batched(module, inputs, s, sampler, batch_size, seed, guidance_interval=interval,
                         guidance_form=form, guidance_model=weak)
        for s in scales
    ])  # fmt: skip
    extra["guidance_kind"] = np.asarray("autoguidance" if weak is not None else "cfg")
    extra |= autoguided
    if real_images is not None:  # the images conditions_from= derived the maps from
        extra["condition_images"] = to_uint8(cycle(real_images, n)).repeat(len(scales), 1, 1, 1).numpy()
    tiles = write_samples(out, module.encoder, images, inputs, key, scales, interval, form, **extra)
    kind = {"labels": "class", "prompts": "prompt"}.get(key, "condition (shown first)")
    print(
        f"sampled {len(images)} images from {path}\nwrote {out / 'samples.npz'} ({len(images)} images) and "
        f"{out / 'samples.png'} (a preview of {tiles.shape[0] * tiles.shape[1]}: one row per {kind}, "
        "a block of columns per guidance scale)"
    )
    return out / "samples.npz"


@hydra_app("sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
