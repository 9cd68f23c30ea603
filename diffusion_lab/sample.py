"""`dlab-sample`: a checkpoint plus a sampler config -> `samples.npz` and a PNG grid.

A class model samples `labels` (default: balanced over its classes); a caption model samples
`prompts` or the lines of `prompts_file`. Either is cycled to `n` images per guidance scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from diffusion_lab.cli import hydra_app
from diffusion_lab.inference import conditions, generate_batched, load_module, pick_device, sampler_for
from diffusion_lab.utils import checks
from diffusion_lab.utils.images import to_model_range, to_unit

log = logging.getLogger("diffusion_lab")


def run(cfg: DictConfig) -> Path:
    # Every argument is checked before the model is loaded or a file is written.
    n = checks.positive_int(cfg, "n", 100)
    scales = checks.guidance_scales(cfg)
    interval = checks.guidance_interval(cfg)
    steps = checks.optional_positive_int(cfg, "steps", 20)
    batch_size = checks.positive_int(cfg, "batch_size", 250)
    out = checks.writable_dir(cfg.paths.output_dir)

    module, path = load_module(cfg.ckpt_path, pick_device(cfg.device), f"{cfg.paths.log_dir}/train/runs")
    log.info("sampling from %s", path)
    inputs, key = conditions(cfg, module.encoder, n)
    sampler = sampler_for(module, cfg.get("sampler"), steps)

    images = torch.cat([
        generate_batched(module, inputs, s, sampler, batch_size, cfg.seed, guidance_interval=interval)
        for s in scales
    ])  # fmt: skip
    recorded = inputs.repeat(len(scales)).numpy() if key == "labels" else np.asarray(inputs * len(scales))
    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy(),
        guidance=np.repeat(np.asarray(scales, dtype=np.float32), n),
        guidance_interval=np.asarray(interval or checks.EVERY_STEP, dtype=np.float32),
        **{key: recorded},
    )
    # One block of rows per guidance scale; a row of each distinct label or prompt when they cycle.
    per_row = min(n, len(set(inputs.tolist() if key == "labels" else inputs)))
    save_image(to_unit(to_model_range(images)), out / "samples.png", nrow=per_row, padding=2)
    print(f"sampled {len(images)} images from {path}\nwrote {out / 'samples.npz'} and {out / 'samples.png'}")
    return out / "samples.npz"


@hydra_app("sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
