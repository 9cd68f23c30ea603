"""`dlab-sample`: a checkpoint plus a sampler config -> `samples.npz` and a PNG grid.

A class model samples `labels` (default: balanced over its classes); a caption model samples
`prompts` or the lines of `prompts_file`. Either is cycled to `n` images per guidance scale; without
`guidance=` the scale is the one the checkpoint's run names as its best (`guidance` in its recipe).
`samples.npz` holds every image; `samples.png` previews at most PREVIEW_IMAGES of them.
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
from diffusion_lab.inference import (
    conditions,
    generate_batched,
    guidance_for,
    load_module,
    pick_device,
    resolve_sampler,
)
from diffusion_lab.utils import checks
from diffusion_lab.utils.images import to_model_range, to_unit

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


def run(cfg: DictConfig) -> Path:
    # Every argument is checked before the model is loaded or a file is written.
    n = checks.positive_int(cfg, "n", 100)
    asked = checks.optional_guidance_scales(cfg)
    interval = checks.guidance_interval(cfg)
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
    inputs, key = conditions(module.encoder, labels, prompts, n, checkpoint=path)
    sampler = resolve_sampler(module, factory, steps)

    # What the model reads of each prompt: cut to the encoder's token limit (a warning, before sampling).
    seen = (
        {"prompts_seen": np.asarray(module.encoder.seen_text(inputs) * len(scales))}
        if key == "prompts"
        else {}
    )
    images = torch.cat([
        generate_batched(module, inputs, s, sampler, batch_size, seed, guidance_interval=interval)
        for s in scales
    ])  # fmt: skip
    recorded = inputs.repeat(len(scales)).numpy() if key == "labels" else np.asarray(inputs * len(scales))
    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy(),
        guidance=np.repeat(np.asarray(scales, dtype=np.float32), n),
        guidance_interval=np.asarray(interval or checks.EVERY_STEP, dtype=np.float32),
        **{key: recorded},
        **seen,
    )
    rows = preview_rows(inputs.tolist() if key == "labels" else inputs, len(scales))
    tiles = images[torch.tensor(rows)]  # (conditions, scales · columns, C, H, W)
    save_image(
        to_unit(to_model_range(tiles.flatten(0, 1))), out / "samples.png", nrow=tiles.shape[1], padding=2
    )
    kind = "class" if key == "labels" else "prompt"
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
