"""OmegaConf resolvers used by conf/, registered by the entry wrapper (`diffusion_lab.cli`)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError, UserError
from diffusion_lab.utils.checkpoints import find_checkpoint, run_dir_of
from diffusion_lab.utils.checks import writable_dir


def _stamp() -> str:
    # The pid makes two commands started in the same second write into different folders.
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def _run_dir(out, runs_dir: str) -> str:
    """`out=` if given, else a new folder under `runs_dir`, checked to be writable.

    Hydra creates this folder before the command starts and reports a failure with a traceback, so
    an unwritable one is reported here, as the one line every command uses for a known mistake.
    """
    path = str(out) if out else f"{runs_dir}/{_stamp()}"
    try:
        writable_dir(path, "out" if out else "paths.log_dir")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    return path


def _resume_dir(ckpt_path, runs_dir: str) -> str | None:
    """A resumed run keeps writing into the run folder of its checkpoint."""
    if ckpt_path is None:
        return None
    try:
        return str(run_dir_of(find_checkpoint(str(ckpt_path), runs_dir)))
    except UserError:
        return None  # train() reports the missing checkpoint with the full explanation


def _record_subdir(run_dir: str) -> str:
    """Where Hydra writes this command's config: `.hydra`, or beside it when the folder already holds
    one, so a resume never rewrites the record of how the run was made."""
    if (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        return f".hydra/rerun_{_stamp()}"
    return ".hydra"


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
    # Cached: every read of the run folder within one command gives the same name.
    OmegaConf.register_new_resolver("dlab_run_dir", _run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_resume_dir", _resume_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_record_subdir", _record_subdir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_wandb_offline", _wandb_offline, replace=True)
