"""`dlab-train`: compose the config, build every object, fit, and return the sweep metric."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks.checkpointing import VerifiedCheckpointIO
from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError, DivergedError
from diffusion_lab.utils.checkpoints import find_checkpoint, newest_checkpoint, picked_line, read_checkpoint
from diffusion_lab.utils.cluster import check_ranks_agree, ddp_ranks_join_their_job, one_ddp_group_per_job
from diffusion_lab.utils.config_checks import check_run_config
from diffusion_lab.utils.instantiate import build, build_module
from diffusion_lab.utils.resume import check_resume_config
from diffusion_lab.utils.run import print_config_tree, record_dir, write_metrics
from diffusion_lab.utils.sweeps import sweeper_optimises

log = logging.getLogger("diffusion_lab")


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU recipe on a machine without one: say which choice asked for it and how to run on the CPU."""
    accelerator = cfg.trainer.get("accelerator")
    if accelerator not in ("gpu", "cuda") or torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    why = f"trainer={choices.get('trainer')}"
    if choices.get("experiment"):
        why += f", chosen by experiment={choices['experiment']}"
    raise ConfigError(
        f"trainer.accelerator={accelerator} ({why}) needs a GPU and this machine has none. "
        "Add trainer=cpu to run the same recipe on the CPU (slower), or run it on a GPU machine."
    )


def resolve_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, checked against this run's config before anything is built:
    `ckpt_path=`, else the newest checkpoint already in the run folder (a fixed `out=` or
    hydra.run.dir run again, a requeued cluster job)."""
    if cfg.get("ckpt_path"):
        runs_dir = f"{cfg.paths.log_dir}/{cfg.task_name}/runs"
        path = find_checkpoint(str(cfg.ckpt_path), runs_dir)
        log.info(picked_line(str(cfg.ckpt_path), path, runs_dir))
    else:
        path = newest_checkpoint(Path(cfg.paths.output_dir) / "checkpoints")
        if path is None:
            return None
        log.info("the run folder already holds %s: resuming from it (delete it to start afresh)", path)
    check_resume_config(read_checkpoint(path).get("run_config"), cfg, path)
    log.info("resuming from %s", path)
    return path


def objective(metrics: dict, cfg: DictConfig, in_sweep: bool, used_by_sweeper: bool = True) -> float | None:
    """The value a Hydra sweeper optimises: the logged metric named by `optimized_metric`. Missing, it is
    an error in a sweep whose sweeper uses it (Optuna would rank the job on nothing), a warning in a grid
    sweep (the basic sweeper ignores it), and nothing in a single run."""
    name = cfg.get("optimized_metric")
    if not name or name in metrics or not in_sweep:
        return metrics.get(name) if name else None
    missing = f"optimized_metric={name}: this run logged no such metric; it logged {sorted(metrics)}. "
    if not used_by_sweeper:
        log.warning(missing + "Hydra's basic sweeper does not use it; an Optuna search would fail here.")
        return None
    raise ConfigError(missing + "Pick one, or log it (val/fid, val/accuracy: add callbacks=with_metrics).")


def first_validation_after(trainer: L.Trainer) -> str | None:
    """Why a run would end before its first validation (so log no `val/*` metric), or None when it
    validates, or when Lightning's numbers cannot tell (a time-based val_check_interval)."""
    if sum(trainer.num_val_batches) == 0:
        return f"it runs no validation batch (trainer.limit_val_batches={trainer.limit_val_batches})"
    if trainer.val_check_batch is None:
        return None
    per_epoch, every = trainer.num_training_batches, trainer.check_val_every_n_epoch
    # Lightning counts val_check_batch over the whole run when check_val_every_n_epoch is None
    first = trainer.val_check_batch if every is None else (every - 1) * per_epoch + trainer.val_check_batch
    ends = [math.inf]
    if trainer.max_steps > 0:
        ends.append(trainer.max_steps * trainer.accumulate_grad_batches)
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        ends.append(trainer.max_epochs * per_epoch)
    if first <= min(ends):
        return None
    return (
        f"its first validation would come after {first} training batches, and it trains {min(ends)} "
        f"(trainer.max_steps={trainer.max_steps}, trainer.max_epochs={trainer.max_epochs}, "
        f"trainer.val_check_interval={trainer.val_check_interval}, "
        f"trainer.check_val_every_n_epoch={every}, {per_epoch} batches an epoch)"
    )


class ValidatesBeforeTheEnd(L.Callback):
    """Stop a sweep's job before its first step when it would never log the `val/*` metric its sweeper
    optimises, rather than train it and fail after. Runs when Lightning has counted the batches."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        why = first_validation_after(trainer)
        if why is not None:
            raise ConfigError(
                f"optimized_metric={self.metric} is logged at validation, and {why}. "
                "Lower trainer.val_check_interval, or raise trainer.max_steps, so each job validates."
            )


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit (and optionally test) the configured model. Returns (metrics, objects)."""
    # Fail on a wrong checkpoint or a missing GPU before spending time on data or models.
    check_accelerator(cfg)
    check_run_config(cfg)
    ckpt_path = resolve_resume(cfg)
    ddp_ranks_join_their_job()

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build("datamodule", cfg.data)
    module = build_module(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    # An entry set to null (`callbacks.rich_progress_bar=null`) switches that callback or logger off.
    callbacks = [build(f"callback {k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v]
    if sweeper_optimises() and str(cfg.get("optimized_metric")).startswith("val/"):
        callbacks.append(ValidatesBeforeTheEnd(cfg.optimized_metric))
    loggers = [build(f"logger {k}", v) for k, v in (cfg.get("logger") or {}).items() if v]
    # Every checkpoint is read back once written; the trainer config's own plugins (SLURM's) stay.
    plugins = [build("trainer plugin", p) for p in cfg.trainer.get("plugins") or []] + [
        VerifiedCheckpointIO()
    ]
    trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    for logger in trainer.loggers:
        logger.log_hyperparams(module.run_config)

    with one_ddp_group_per_job():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        check_ranks_agree(trainer, module)
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule)
            metrics.update({k: v.item() for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)})
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise DivergedError(
            f"training finished with non-finite metrics {bad}; lower optimizer.lr and retrain.",
            step=trainer.global_step,
        )
    if not trainer.fast_dev_run:
        write_metrics(metrics, cfg.paths.output_dir)
    log.info("final metrics: %s", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    print_config_tree(cfg, save_to=record_dir(cfg))
    metrics, _ = train(cfg)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    return objective(metrics, cfg, in_sweep, sweeper_optimises())


if __name__ == "__main__":
    main()
