"""A grid of samples at validation: one row per class (or prompt), a block of columns per guidance scale."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from diffusion_lab.callbacks.validation_sampling import sampling_due
from diffusion_lab.condition import count, repeat_rows, take_rows
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import condition_preview, resolve_sampler, spatial_encoders
from diffusion_lab.module import encoder_inputs
from diffusion_lab.utils.images import to_unit


def condition_grid(module, rows, per_row: int, guidance_scales, sampler, seed: int = 0) -> torch.Tensor:
    """Images (3, H, W) in [0, 1]: row r holds `per_row` samples of row r of `rows` (a label, a prompt, a
    map, or a mapping of several) at each guidance scale; a spatial condition is shown first in its row."""
    inputs = repeat_rows(rows, per_row)
    preview = condition_preview(module.encoder, rows, module.net.in_channels)
    blocks = [] if preview is None else [preview[:, None].to(module.device)]
    for scale in guidance_scales:
        # The same seed for every scale, so columns differ only by the guidance.
        generator = torch.Generator().manual_seed(seed)
        images = module.generate(inputs, guidance_scale=scale, sampler=sampler, generator=generator)
        blocks.append(images.view(count(rows), per_row, *images.shape[1:]))
    # (rows, scales * per_row, C, H, W): columns grouped by guidance scale.
    grid = torch.cat(blocks, dim=1)
    return make_grid(to_unit(grid.flatten(0, 1)).cpu(), nrow=grid.shape[1], padding=2, pad_value=1.0)


class SampleGrid(L.Callback):
    """Samples with the EMA weights during validation, saves a PNG and logs it to every image logger.

    Rows are the classes of a class-conditional model, `prompts` (required for a caption model), or the
    conditions of the first `spatial_rows` validation images for a model with a spatial condition (shown
    first in each row).
    """

    def __init__(
        self,
        per_class: int = 4,
        guidance_scales=(1.0, 3.0),
        num_steps: int = 25,
        every_n_epochs: int = 1,
        seed: int = 0,
        prompts: list[str] | None = None,
        spatial_rows: int = 8,
    ):
        self.per_class, self.guidance_scales = per_class, list(guidance_scales)
        self.num_steps, self.every_n_epochs, self.seed = num_steps, every_n_epochs, seed
        self.prompts = list(prompts) if prompts else None
        self.spatial_rows = spatial_rows

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.encoder.input_key == "caption" and not self.prompts:
            raise ConfigError(
                "callbacks.sample_grid.prompts is empty, and a caption model's sample grid needs prompts: "
                'set callbacks.sample_grid.prompts=\'["a thick seven","a thin one"]\' (or sample_grid=null)'
            )

    def _rows(self, pl_module, batch: dict):
        if spatial_encoders(pl_module.encoder):  # the conditions of real validation images
            return take_rows(encoder_inputs(pl_module.encoder, batch), 0, self.spatial_rows), (
                f"rows: the conditions of the first {self.spatial_rows} validation images (shown first)"
            )
        if pl_module.encoder.input_key == "caption":
            return self.prompts, "rows: " + " | ".join(self.prompts)
        labels = pl_module.encoder.default_inputs()  # one row per class
        return labels, f"rows: classes {labels[0].item()}-{labels[-1].item()}"

    # Sampling runs inside the validation epoch, where the EMA callback has swapped its weights in,
    # whatever the order of the callbacks.
    @rank_zero_only
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not sampling_due(trainer, batch_idx, self.every_n_epochs):
            return
        rows, caption = self._rows(pl_module, batch)
        sampler = resolve_sampler(pl_module, None, self.num_steps)  # the run's own, with fewer steps
        grid = condition_grid(pl_module, rows, self.per_class, self.guidance_scales, sampler, self.seed)
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        caption += f"; column blocks: guidance {self.guidance_scales}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples", images=[grid], caption=[caption], step=trainer.global_step)
