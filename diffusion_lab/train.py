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

from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError, DivergedError
from diffusion_lab.utils.checkpoints import find_checkpoint, newest_checkpoint, picked_line, read_checkpoint
from diffusion_lab.utils.cluster import check_ranks_agree, ddp_ranks_join_their_job, one_ddp_group_per_job
from diffusion_lab.utils.instantiate import build, build_module
from diffusion_lab.utils.resume import check_resume_config
from diffusion_lab.utils.run import print_config_tree, record_dir, write_metrics

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


def objective(metrics: dict, cfg: DictConfig, in_sweep: bool) -> float | None:
    """The value a Hydra sweeper optimises: the logged metric named by `optimized_metric`. Missing in a
    sweep, it is an error (the sweeper would rank the job on nothing); a single run just returns None."""
    name = cfg.get("optimized_metric")
    if not name or (name not in metrics and not in_sweep):
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name}: this run logged no such metric; it logged {sorted(metrics)}. "
            "Pick one of those, or log it (val/fid, val/accuracy: add callbacks=with_metrics)."
        )
    return metrics[name]


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit (and optionally test) the configured model. Returns (metrics, objects)."""
    # Fail on a wrong checkpoint or a missing GPU before spending time on data or models.
    check_accelerator(cfg)
    ckpt_path = resolve_resume(cfg)
    ddp_ranks_join_their_job()

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build("datamodule", cfg.data)
    module = build_module(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    # An entry set to null (`callbacks.rich_progress_bar=null`) switches that callback or logger off.
    callbacks = [build(f"callback {k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v]
    loggers = [build(f"logger {k}", v) for k, v in (cfg.get("logger") or {}).items() if v]
    trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
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
            f"training finished with non-finite metrics {bad}; lower optimizer.lr and retrain."
        )
    if not trainer.fast_dev_run:
        write_metrics(metrics, cfg.paths.output_dir)
    log.info("final metrics: %s", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    print_config_tree(cfg, save_to=record_dir(cfg))
    metrics, _ = train(cfg)
    return objective(metrics, cfg, in_sweep=HydraConfig.get().mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
