"""A progress bar that counts what the run is limited by: optimizer steps for step-based recipes.

Lightning's bar counts batches of the current epoch against min(epoch length, steps left), which
reads `Epoch 0/-2` under `max_epochs=-1` and `12/3` after a resume. With `trainer.max_steps` set,
this bar shows `step <global step>/<max_steps>` across epochs and resumes instead.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    @property
    def _step_based(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_based else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._step_based:
            description = f"step (epoch {current_epoch})"
        elif self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description = f"Epoch {current_epoch}/{self.trainer.max_epochs - 1}"
        else:
            description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._step_based:
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._step_based:  # the reset above zeroes the bar; it counts steps, not this epoch's batches
            self._update(self.train_progress_bar_id, trainer.global_step)
