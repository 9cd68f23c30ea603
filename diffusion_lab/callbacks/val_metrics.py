"""FID / KID / conditional accuracy (and each spatial condition's fidelity) of EMA samples during
validation, logged as curves."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.validation_sampling import sampling_due
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import generate_batched, resolve_sampler, spatial_encoders
from diffusion_lab.metrics.fid import MNISTEvaluator
from diffusion_lab.metrics.targets import Targets, targets_for


class GenerativeMetrics(L.Callback):
    """Every `every_n_epochs`, sample `n` balanced labels (or, for a spatial model, the maps of `n`
    held-out test digits, as `dlab-eval` does) and log `val/fid`, `val/kid`, `val/accuracy`, and each
    spatial condition's fidelity score (e.g. `val/stroke_f1`, `val/lowres_psnr`).

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
        self.targets: Targets | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.encoder.input_key != "label" and not spatial_encoders(pl_module.encoder):
            raise ConfigError(
                "callbacks=with_metrics scores class-conditional and spatial models; for a caption model use "
                "the default callbacks and measure it afterwards with dlab-eval (caption fidelity)"
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
        if self.targets is None:  # the same targets at every validation, so the curves compare
            self.targets = targets_for(pl_module, self.n, data_dir=self.data_dir, seed=self.seed)
        images = generate_batched(
            pl_module, self.targets.inputs, self.guidance_scale, sampler, self.batch_size, self.seed,
            progress=False,
        )  # fmt: skip
        result = self.evaluator.evaluate(images, self.targets.digits)
        scores = {key: result[key] for key in ("fid", "kid_mean", "accuracy", "fid_real_floor")}
        return scores | self.targets.fidelity(images)
