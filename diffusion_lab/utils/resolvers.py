"""OmegaConf resolvers used by conf/, registered by the entry wrapper (`diffusion_lab.cli`)."""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError, UserError, exit_with
from diffusion_lab.utils import cluster
from diffusion_lab.utils.checkpoints import find_checkpoint, run_dir_of
from diffusion_lab.utils.checks import writable_dir


def _stamp() -> str:
    # The pid makes two commands started in the same second write into different folders.
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def _run_dir(out, runs_dir: str) -> str:
    """`out=` if given, else a new `<time>_<pid>` folder under `runs_dir`, checked to be writable.

    Hydra creates this folder before the command starts and reports a failure with a traceback, so
    an unwritable one is reported here, as the one line every command uses for a known mistake.
    """
    path = str(out) if out else f"{runs_dir}/{_stamp()}"
    try:
        writable_dir(path, "out" if out else "paths.log_dir")
    except ConfigError as err:
        exit_with(err)
    return path


def _train_run_dir(ckpt_path, runs_dir: str) -> str | None:
    """Where a training run writes when `out=` is not given: the run folder of the checkpoint it
    resumes; inside a SLURM or torchrun job, a folder named after the job (every rank and every
    requeue of the job agree on it); else None (a new `<time>_<pid>` folder)."""
    if ckpt_path is None:
        job = cluster.cluster_job_id()
        return f"{runs_dir}/{job}" if job else None
    try:
        return str(run_dir_of(find_checkpoint(str(ckpt_path), runs_dir)))
    except UserError:
        return None  # train() reports the missing checkpoint with the full explanation


def _sweep_dir(multiruns_dir: str) -> str:
    """A multirun's folder: named after the cluster job when inside one, else after the time."""
    return f"{multiruns_dir}/{cluster.cluster_job_id() or datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"


def _record_subdir(run_dir: str) -> str | None:
    """Where Hydra writes this command's config: `.hydra`, or beside it when the folder already holds
    one, so a resume never rewrites the record of how the run was made. Rank 0 alone writes it."""
    if not cluster.is_launch_rank_zero():
        return None
    if (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        return f".hydra/rerun_{_stamp()}"
    return ".hydra"


def _log_file(path: str) -> str:
    """The command's log file; ranks other than 0 log to the console only."""
    return path if cluster.is_launch_rank_zero() else os.devnull


def _wandb_group(mode, sweep_dir: str) -> str | None:
    """A multirun's jobs share one W&B group: the sweep's folder name."""
    return Path(sweep_dir).name if str(mode).endswith("MULTIRUN") else None


def _wandb_name(overrides: str, task_name: str) -> str:
    """A W&B run's name: the job's overrides (what sets it apart in a sweep), else the task."""
    return overrides or task_name


def _wandb_run_id(run_dir: str) -> str:
    """The W&B run id kept in the run folder (`wandb_id.txt`), so a resumed or requeued run goes on
    logging into the same W&B run; a new one for a new folder."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if path.parent.is_dir() and cluster.is_launch_rank_zero():
        path.write_text(run_id + "\n")
    return run_id


def _wandb_offline() -> bool:
    """Offline unless the user is logged in or asked for online mode explicitly."""
    if os.environ.get("WANDB_MODE") in ("online", "run"):
        return False
    netrc = Path("~/.netrc").expanduser()  # where `wandb login` stores the key
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    return not (os.environ.get("WANDB_API_KEY") or logged_in)


def _derived_conditions(condition) -> dict:
    """{source: transform options} of every spatial condition in a `condition` config (one, or the
    sources of a combined one): what the DataModule derives from each image (data.conditions)."""
    if not isinstance(condition, DictConfig):
        return {}
    if "sources" in condition:
        return {k: v for source in condition.sources.values() for k, v in _derived_conditions(source).items()}
    if "source" in condition and "transform" in condition:
        return {condition.source: OmegaConf.to_container(condition.transform, resolve=True)}
    return {}


def register() -> None:
    # Not ${hydra:runtime.cwd}: a multirun resolves hydra.sweep.dir before the Hydra config exists.
    OmegaConf.register_new_resolver("dlab_cwd", os.getcwd, replace=True)
    # Cached: every read of the run folder within one command gives the same name.
    OmegaConf.register_new_resolver("dlab_run_dir", _run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_train_run_dir", _train_run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_sweep_dir", _sweep_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_record_subdir", _record_subdir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dlab_log_file", _log_file, replace=True)
    OmegaConf.register_new_resolver("dlab_wandb_offline", _wandb_offline, replace=True)
    OmegaConf.register_new_resolver("dlab_wandb_group", _wandb_group, replace=True)
    OmegaConf.register_new_resolver("dlab_wandb_name", _wandb_name, replace=True)
    OmegaConf.register_new_resolver("dlab_derived_conditions", _derived_conditions, replace=True)
    OmegaConf.register_new_resolver("dlab_wandb_run_id", _wandb_run_id, replace=True, use_cache=True)
