"""What a run writes besides checkpoints and logs: the printed config and the final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


def record_dir(cfg: DictConfig) -> Path | None:
    """The folder holding this command's `.hydra` record (`.hydra/rerun_*` on a resume), or None."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    return Path(cfg.paths.output_dir) / HydraConfig.get().output_subdir


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


@rank_zero_only
def write_metrics(metrics: dict, output_dir: str | Path) -> None:
    """Final metrics as flat JSON in the run folder; `dlab-report` reads these from each job."""
    clean = {k: float(v) for k, v in metrics.items()}
    (Path(output_dir) / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True))
