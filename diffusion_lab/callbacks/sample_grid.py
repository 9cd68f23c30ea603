"""A labelled grid of samples at validation: one row per class, a block of columns per guidance scale."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from diffusion_lab.utils.images import to_unit


def class_grid(
    module, num_classes: int, per_class: int, guidance_scales, sampler, seed: int = 0
) -> torch.Tensor:
    """Images (3, H, W) in [0, 1]: row c holds `per_class` samples of class c at each guidance scale."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    blocks = []
    for scale in guidance_scales:
        # The same seed for every scale, so columns differ only by the guidance.
        generator = torch.Generator().manual_seed(seed)
        images = module.generate(labels, guidance_scale=scale, sampler=sampler, generator=generator)
        blocks.append(images.view(num_classes, per_class, *images.shape[1:]))
    # (classes, scales * per_class, C, H, W): columns grouped by guidance scale.
    rows = torch.cat(blocks, dim=1)
    flat = to_unit(rows.flatten(0, 1)).cpu()
    return make_grid(flat, nrow=rows.shape[1], padding=2, pad_value=1.0)


class SampleGrid(L.Callback):
    """Samples with the EMA weights during validation, saves a PNG and logs it to every image logger."""

    def __init__(
        self,
        per_class: int = 4,
        guidance_scales=(1.0, 3.0),
        num_steps: int = 25,
        every_n_epochs: int = 1,
        seed: int = 0,
    ):
        self.per_class, self.guidance_scales = per_class, list(guidance_scales)
        self.num_steps, self.every_n_epochs, self.seed = num_steps, every_n_epochs, seed

    # Sampling runs inside the validation epoch, where the EMA callback has swapped its weights in,
    # whatever the order of the callbacks.
    @rank_zero_only
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if pl_module.encoder.input_key != "label":
            return  # caption models get their grids from a prompt list, not class rows
        sampler = pl_module.make_sampler(num_steps=self.num_steps)
        grid = class_grid(
            pl_module, pl_module.encoder.num_classes, self.per_class, self.guidance_scales, sampler, self.seed
        )
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        caption = f"rows: classes 0-9; column blocks: guidance {self.guidance_scales}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples", images=[grid], caption=[caption], step=trainer.global_step)
