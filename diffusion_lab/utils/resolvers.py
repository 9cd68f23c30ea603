"""OmegaConf resolvers used by conf/. Registered on import, before Hydra composes."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.utils.checkpoints import find_checkpoint, run_dir_of


def _run_dir(ckpt_path, runs_dir: str, stamp: str) -> str:
    """A resumed run keeps writing into its own folder; anything else gets a new one."""
    if ckpt_path is not None:
        try:
            return str(run_dir_of(find_checkpoint(str(ckpt_path), runs_dir)))
        except FileNotFoundError:
            pass  # train() reports the missing checkpoint with the full explanation
    return f"{runs_dir}/{stamp}"


def _wandb_offline() -> bool:
    """Offline unless the user is logged in or asked for online mode explicitly."""
    if os.environ.get("WANDB_MODE") in ("online", "run"):
        return False
    netrc = Path("~/.netrc").expanduser()  # where `wandb login` stores the key
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    return not (os.environ.get("WANDB_API_KEY") or logged_in)


def register() -> None:
    # Not ${hydra:runtime.cwd}: a multirun resolves hydra.sweep.dir before the Hydra config exists.
    OmegaConf.register_new_resolver("dlab_cwd", os.getcwd, replace=True)
    OmegaConf.register_new_resolver("dlab_run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("dlab_wandb_offline", _wandb_offline, replace=True)


register()
