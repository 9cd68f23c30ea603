"""`dlab-sample`: a checkpoint plus a sampler config -> `samples.npz` and a PNG grid."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.progress import track
from torchvision.utils import save_image

import diffusion_lab.utils.resolvers  # noqa: F401  (registers ${dlab_*:} before Hydra composes)
from diffusion_lab import CONFIG_DIR
from diffusion_lab.module import DiffusionModule
from diffusion_lab.train import build_module
from diffusion_lab.utils.checkpoints import find_checkpoint

log = logging.getLogger("diffusion_lab")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_module(
    ckpt: str | Path, device: str | torch.device = "cpu", runs_dir: str | Path = "outputs/train/runs"
):
    """Rebuild the trained module from the config stored in its checkpoint, with the EMA weights.

    The EMA callback stores the averaged weights as the checkpoint's `state_dict`.
    """
    path = find_checkpoint(str(ckpt), runs_dir)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not checkpoint.get("run_config"):
        raise ValueError(
            f"{path} holds no run_config: it was not written by dlab-train, so it cannot be rebuilt."
        )
    module: DiffusionModule = build_module(OmegaConf.create(checkpoint["run_config"]))
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["run_config"]
    return module.to(device).eval(), path


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def generate_batched(module, labels: torch.Tensor, guidance: float, sampler, batch_size: int, seed: int):
    """uint8 images (N, C, H, W) for `labels`, in batches; batch k is seeded with seed + k."""
    chunks = []
    batches = labels.split(batch_size)
    for k, chunk in enumerate(track(batches, description=f"sampling (guidance {guidance:g})")):
        generator = torch.Generator().manual_seed(seed + k)
        images = module.generate(chunk, guidance_scale=guidance, sampler=sampler, generator=generator)
        chunks.append(images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu())
    return torch.cat(chunks)


def sampler_for(module: DiffusionModule, sampler_cfg: DictConfig | None, steps: int | None):
    overrides = {"num_steps": steps} if steps is not None else {}
    if sampler_cfg is None:
        return module.make_sampler(**overrides)
    factory = instantiate(sampler_cfg)
    return factory(schedule=module.schedule, prediction_type=module.hparams.prediction_type, **overrides)


def run(cfg: DictConfig) -> Path:
    device = pick_device(cfg.device)
    module, path = load_module(cfg.ckpt, device, f"{cfg.paths.log_dir}/train/runs")
    log.info("sampling from %s", path)
    num_classes = module.encoder.num_classes
    if cfg.labels is None:
        labels = balanced_labels(cfg.n, num_classes)
    else:
        wanted = torch.tensor(list(cfg.labels) if isinstance(cfg.labels, ListConfig) else [cfg.labels])
        labels = wanted.repeat((cfg.n + len(wanted) - 1) // len(wanted))[: cfg.n]
    scales = list(cfg.guidance) if isinstance(cfg.guidance, ListConfig) else [cfg.guidance]
    sampler = sampler_for(module, cfg.get("sampler"), cfg.steps)

    images = torch.cat(
        [generate_batched(module, labels, s, sampler, cfg.batch_size, cfg.seed) for s in scales]
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy(),
        labels=labels.repeat(len(scales)).numpy(),
        guidance=np.repeat(np.asarray(scales, dtype=np.float32), len(labels)),
    )
    # One block of rows per guidance scale; rows of `num_classes` when labels are balanced.
    save_image(images.float().div(255), out / "samples.png", nrow=min(len(labels), num_classes), padding=2)
    log.info("wrote %s and %s", out / "samples.npz", out / "samples.png")
    return out / "samples.npz"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
