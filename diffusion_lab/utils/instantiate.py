"""Building objects from configs: one logged `instantiate`, and the LightningModule of a run config."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("diffusion_lab")


def build(name: str, node: DictConfig, **kwargs):
    """`hydra.utils.instantiate` that says what it built (the run log shows every object)."""
    log.info("instantiating %s <%s>", name, node.get("_target_", "?"))
    return instantiate(node, **kwargs)


def build_module(cfg: DictConfig):
    """The DiffusionModule of a composed config (training, and rebuilding it from a checkpoint)."""
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
