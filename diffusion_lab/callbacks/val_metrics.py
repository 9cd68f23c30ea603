"""FID / KID / conditional accuracy of EMA samples during validation, logged as curves."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.validation_sampling import sampling_due
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import generate_batched, resolve_sampler
from diffusion_lab.metrics.fid import MNISTEvaluator


class GenerativeMetrics(L.Callback):
    """Every `every_n_epochs`, sample `n` balanced labels and log `val/fid`, `val/kid`, `val/accuracy`.

    Needs the cached evaluator (`dlab-train-evaluator`); a missing one fails at setup, before training.
    Only rank zero samples and scores (FID is not additive over ranks).
    """

    def __init__(
        self,
        cache_dir: str,
        data_dir: str,
        n: int = 500,
        every_n_epochs: int = 1,
        guidance_scale: float = 2.0,
        num_steps: int = 20,
        batch_size: int = 250,
        seed: int = 0,
    ):
        self.cache_dir, self.data_dir = cache_dir, data_dir
        self.n, self.every_n_epochs, self.guidance_scale = n, every_n_epochs, guidance_scale
        self.num_steps, self.batch_size, self.seed = num_steps, batch_size, seed
        self.evaluator: MNISTEvaluator | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.encoder.input_key != "label":
            raise ConfigError(
                "callbacks=with_metrics scores class-conditional models; for a caption model use the "
                "default callbacks and measure it afterwards with dlab-eval (caption fidelity)"
            )
        if trainer.is_global_zero and self.evaluator is None:
            self.evaluator = MNISTEvaluator.from_cache(self.cache_dir, self.data_dir)
            self.evaluator.require(self.n, "callbacks.generative_metrics.n")

    # Inside the validation epoch, so the EMA weights are the ones being scored.
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not sampling_due(trainer, batch_idx, self.every_n_epochs):
            return
        metrics = self._score(pl_module)
        for name, value in (metrics or {}).items():
            pl_module.log(f"val/{name}", value, rank_zero_only=True)

    @rank_zero_only
    def _score(self, pl_module) -> dict:
        sampler = resolve_sampler(pl_module, None, self.num_steps)  # the run's own, with fewer steps
        labels = pl_module.encoder.default_inputs(self.n)
        images = generate_batched(
            pl_module, labels, self.guidance_scale, sampler, self.batch_size, self.seed, progress=False
        )
        result = self.evaluator.evaluate(images, labels)
        return {key: result[key] for key in ("fid", "kid_mean", "accuracy", "fid_real_floor")}
