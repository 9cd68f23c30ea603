"""Glue around a Hydra task: config printing, instantiation with logging, and cleanup."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("diffusion_lab")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Print the composed config as a rich tree, one branch per top-level group."""
    tree = rich.tree.Tree("config", style="bold")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold cyan")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
    if save_to is not None:
        with open(Path(save_to) / "config_tree.log", "w") as file:
            rich.print(tree, file=file)


def build(name: str, node: DictConfig, **kwargs):
    """`hydra.utils.instantiate` that says what it built (the run log shows every object)."""
    log.info("instantiating %s <%s>", name, node.get("_target_", "?"))
    return instantiate(node, **kwargs)


@rank_zero_only
def write_metrics(metrics: dict, output_dir: str | Path) -> None:
    """Final metrics as flat JSON in the run folder; `dlab-report` reads these from each job."""
    clean = {k: float(v) for k, v in metrics.items()}
    (Path(output_dir) / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True))


def task_wrapper(task):
    """Log failures with the run folder and always close W&B, so a sweep's next job starts clean."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception:
            log.exception("task failed; outputs are in %s", cfg.paths.get("output_dir"))
            raise
        finally:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None and wandb.run is not None:
                wandb.finish()

    return wrapped
