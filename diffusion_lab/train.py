"""`dlab-train`: compose the config, build every object, fit, and return the sweep metric."""

from __future__ import annotations

import logging
import warnings

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import diffusion_lab.utils.resolvers  # noqa: F401  (registers ${dlab_*:} before Hydra composes)
from diffusion_lab import CONFIG_DIR
from diffusion_lab.module import DiffusionModule
from diffusion_lab.utils.checkpoints import find_checkpoint
from diffusion_lab.utils.run import build, print_config_tree, task_wrapper, write_metrics

log = logging.getLogger("diffusion_lab")

# With OnExceptionCheckpoint, Lightning turns fit(ckpt_path=None) into "last" and warns twice when a
# fresh run folder has no checkpoint yet. Resuming here is explicit (`ckpt_path=`), so both are noise.
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings(
    "ignore", message=r".*\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint"
)


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The LightningModule from a composed config (also used to rebuild it from a checkpoint)."""
    return build(
        "module",
        cfg.module,
        net=build("net", cfg.model),
        schedule=build("schedule", cfg.schedule),
        encoder=build("condition encoder", cfg.condition),
        sampler=build("sampler", cfg.sampler),
        optimizer=build("optimizer", cfg.optimizer),
        lr_scheduler=build("lr_scheduler", cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    )


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit (and optionally test) the configured model. Returns (metrics, objects)."""
    # Fail on a missing checkpoint before spending time on data or models.
    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path = find_checkpoint(str(cfg.ckpt_path), f"{cfg.paths.log_dir}/{cfg.task_name}/runs")
        log.info("resuming from %s", ckpt_path)

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

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: v.item() for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)})
    if not trainer.fast_dev_run:
        write_metrics(metrics, cfg.paths.output_dir)
    log.info("final metrics: %s", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    print_config_tree(cfg, save_to=cfg.paths.output_dir)
    metrics, _ = train(cfg)
    # The value a Hydra sweeper (e.g. Optuna) optimises.
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
