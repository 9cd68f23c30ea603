"""DiffusionModule: trains a conditional denoiser on a noise schedule and samples from it.

Everything swappable is passed in (net, schedule, encoder, sampler, optimizer); this file only
holds the training objective, the optimiser wiring and a batched `generate` for callbacks,
`dlab-sample` and `dlab-eval`. EMA lives in `callbacks/ema.py` (Lightning swaps it in for
validation and stores it as the checkpoint's `state_dict`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.diffusion.edm import EDMPreconditioned, EDMSchedule
from diffusion_lab.diffusion.edm_samplers import SigmaSampler
from diffusion_lab.diffusion.samplers import Sampler
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import DivergedError


def fixed_total_steps(lr_scheduler: Callable) -> int | None:
    """The `total_steps` an LR-schedule partial was given (`lr_scheduler.total_steps=<n>`), read from its
    public signature (where a partial's keywords are defaults); None when neither the config nor the schedule
    function names a length, or it is null: `configure_optimizers` then passes the run's own length."""
    parameter = inspect.signature(lr_scheduler).parameters.get("total_steps")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def encoder_inputs(encoder: nn.Module, batch: dict):
    """What `encoder` reads of a batch: its `input_key` entry, or {key: entry} for a combined encoder."""
    key = encoder.input_key
    return {k: batch[k] for k in key} if isinstance(key, tuple) else batch[key]


def _on(device: torch.device, inputs):
    """Labels and maps moved to `device`; prompts (a list) stay; a mapping is moved entry by entry."""
    if isinstance(inputs, Mapping):
        return {key: _on(device, value) for key, value in inputs.items()}
    return inputs.to(device) if torch.is_tensor(inputs) else list(inputs)


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | EDMSchedule,
        encoder: nn.Module,
        sampler: Callable[..., Sampler | SigmaSampler],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable | None = None,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        seed: int = 0,
        compile: bool = False,
    ):
        super().__init__()
        # logger=False: train() logs the whole resolved run config once; these are a subset of it.
        self.save_hyperparameters(
            ignore=["net", "schedule", "encoder", "sampler", "optimizer", "lr_scheduler"], logger=False
        )
        self.net, self.schedule, self.encoder = net, schedule, encoder
        if hasattr(encoder, "read_by"):  # spatial encoders build only the parts the net's method reads
            encoder.read_by(net.conditioning)
        # The run's own sampler; `inference.resolve_sampler` builds others (steps, another config) from it.
        self.sampler_factory = sampler
        self.sampler = sampler(schedule=schedule, prediction_type=prediction_type)
        # None in a module loaded to sample (`utils.instantiate.build_sampling_module`): it never trains.
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        # The resolved run config, stored in checkpoints so `dlab-sample`/`dlab-eval` can rebuild the
        # module without the user repeating the overrides (set by train()).
        self.run_config: dict | None = None

    def denoiser(self) -> nn.Module:
        """What the objective and the sampler call as model(x, t, condition): the net, or for
        prediction_type="edm" the net inside EDM's preconditioning (σ in, D = x̂₀ out). Made per call, not
        kept as a submodule, so the state_dict holds the net's keys once, as it always has."""
        if self.hparams.prediction_type == "edm":
            return EDMPreconditioned(self.net, self.schedule)
        return self.net

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            # In place (nn.Module.compile), so state_dict keys and checkpoints stay the same.
            self.net.compile()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        return self.net(x_t, t, condition)

    # ---------------------------------------------------------------- objective
    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Weighted MSE between the model's output and the target of the configured prediction type, at
        timesteps (or EDM's σ) the schedule draws."""
        x0 = batch["image"]  # (B, C, H, W) in [-1, 1]
        condition = self.encoder(encoder_inputs(self.encoder, batch))
        t = self.schedule.sample_times(x0.shape[0], self.device, generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        x_t = self.schedule.add_noise(x0, noise, t)
        prediction = self.denoiser()(x_t, t, condition)
        target = self.schedule.target(self.hparams.prediction_type, x0, noise, t)
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        weight = self.schedule.loss_weight(
            t, self.hparams.loss_weighting, self.hparams.prediction_type, self.hparams.min_snr_gamma
        )
        return (weight * per_sample).mean()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Reseed from (seed, epoch, batch, rank): noise, timesteps, CFG label dropout and dropout
        # masks then depend only on the position in training, so a resumed run continues
        # exactly as an uninterrupted one would (the data order is seeded by epoch too).
        torch.manual_seed(
            hash((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**63 - 1)
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self._step_loss = loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # A non-finite loss or gradient stops the run before it reaches the weights, so it can never
        # be saved as a checkpoint. Under fp16 loss scaling inf gradients are expected (the scaler
        # skips those steps), so the check is left to the scaler there.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        # One multi-tensor kernel for every gradient's norm (as clip_grad_norm_ does), not one per parameter.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if not torch.isfinite(torch.stack([self._step_loss.float(), grad_norm])).all():
            lr = optimizer.param_groups[0]["lr"]
            raise DivergedError(
                f"training diverged at step {self.global_step}: loss {self._step_loss.item():.4g}, "
                f"gradient norm {grad_norm.item():.4g}. The weights of this step were not applied or saved. "
                f"Lower optimizer.lr (the learning rate was {lr:.3g}) or lengthen lr_scheduler.warmup_steps.",
                step=self.global_step,
            )

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        # A fixed generator per batch: the validation loss of two epochs differs only by the weights.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(batch, generator=generator)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | Sequence[str] | Mapping,
        guidance_scale: float | Mapping[str, float] = 1.0,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        guidance_interval: tuple[float, float] | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
        guidance_form: str = "nested",
        guidance_model: DiffusionModule | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ):
        """Sample one image per label, caption or map (or per row of a {input key: values} mapping for a model
        with several conditions; a source left out is null) in [-1, 1], with classifier-free guidance, or
        with autoguidance against `guidance_model` (a weaker model of the same task, given the same inputs).
        `on_step(i, x̂₀)`: called after each sampling step (`sampling.sample`)."""
        was_training = self.encoder.training
        self.encoder.eval()  # never drop the condition while sampling
        try:
            condition = self.encoder(_on(self.device, inputs))
            weak_model = None
            if guidance_model is not None:
                weak_condition = guidance_model.encoder.eval()(_on(self.device, inputs))
                weak_denoiser = guidance_model.denoiser()
                weak_model = lambda x, t: weak_denoiser(x, t, weak_condition)  # noqa: E731
            n = condition.batch_size
            null = self.encoder.null(n, self.device)
            image_shape = (self.net.in_channels, self.net.image_size, self.net.image_size)
            return sample(
                self.denoiser(),
                sampler or self.sampler,
                (n, *image_shape),
                condition=condition,
                null_condition=null,
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                generator=generator,
                device=self.device,
                return_intermediates=return_intermediates,
                progress=progress,
                guidance_form=guidance_form,
                weak_model=weak_model,
                on_step=on_step,
            )
        finally:
            self.encoder.train(was_training)

    # ---------------------------------------------------------------- optimisation
    def build_optimizer(self, precision: str = "32-true") -> torch.optim.Optimizer:
        """The configured optimizer over all parameters, with a fused step where that is allowed.

        A fused Adam/AdamW/SGD step is one kernel over every parameter: 3.5x faster than the default
        per-parameter loop on CPU (benchmarks/README.md, "Speed"). It stays off under mixed precision,
        where Lightning refuses gradient clipping with an optimizer that unscales gradients itself, and
        when the config sets `fused` or `foreach` (`optimizer.fused=false` opts out).
        """
        factory = self.optimizer_factory
        fuse = (
            getattr(factory, "func", None) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
            and not {"fused", "foreach"} & set(getattr(factory, "keywords", {}))
            and "mixed" not in precision
            and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.parameters())
        )
        return factory(params=self.parameters(), **({"fused": True} if fuse else {}))

    def configure_optimizers(self):
        optimizer = self.build_optimizer(str(self.trainer.precision))
        if self.lr_scheduler_factory is None:
            return optimizer
        # A fixed `total_steps` in the config wins (so a preempted run keeps its schedule);
        # otherwise the schedule spans this run.
        if fixed_total_steps(self.lr_scheduler_factory) is None:
            scheduler = self.lr_scheduler_factory(
                optimizer=optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
            )
        else:
            scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_config = checkpoint.get("run_config")
