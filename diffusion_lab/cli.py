"""The entry wrapper that every console script shares.

Each command is a Hydra app over `conf/<name>.yaml`, so they share one vocabulary: `key=value`
overrides, unknown keys rejected, `ckpt_path=` to read a checkpoint, `out=` for the folder written,
`paths.*` for the rest, and `--help`. The wrapper registers our resolvers, silences warnings that do
not apply to us, closes W&B, and turns known errors (`diffusion_lab.errors.UserError`) into one line
and an exit code, with the traceback only when `HYDRA_FULL_ERROR=1`. Every command leaves `status.json`
in its run folder (how it ended, as data: `utils/sweeps.py`) and a failed one also its line in `error.txt`.
In a multirun (`-m`), a failed job prints its line and returns NaN, so the sweep goes on to its next job
(and an Optuna search records a failed trial); the sweep's summary line and exit code 1 come at the end
(`utils/sweep_callback.py`). A signal (Ctrl-C, a cluster's deadline) still stops the whole sweep.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from diffusion_lab import CONFIG_DIR
from diffusion_lab.errors import Interrupted, UserError, exit_with
from diffusion_lab.utils import config_checks, resolvers, sweep_callback
from diffusion_lab.utils.sweeps import write_status

# Warnings that describe choices we made on purpose.
IGNORED_WARNINGS = [
    # MNIST is an in-memory tensor: worker processes only add overhead (see data/mnist.py).
    r".*does not have many workers which may be a bottleneck.*",
    # Caption shards report an exact per-rank length by construction (data/webdataset_shards.py).
    r".*Your `IterableDataset` has `__len__` defined.*",
]


def _known_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, also when Hydra's instantiate wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _output_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


@rank_zero_only
def _record_end(error: BaseException | None = None, message: str | None = None) -> None:
    """status.json (for dlab-report and the sweep summary) and, after an error, its line in error.txt."""
    out = _output_dir()
    if out is None or not out.is_dir():
        return
    write_status(out, error, message)
    if error is None:  # e.g. a resume that finished what an interrupted run began
        (out / "error.txt").unlink(missing_ok=True)
    else:
        (out / "error.txt").write_text(message + "\n")


def _sweep_goes_on(err: BaseException) -> bool:
    """Whether a failed job lets its multirun go on: an error does; a signal (Ctrl-C, a cluster's
    deadline: `Interrupted`, KeyboardInterrupt) stops the whole sweep."""
    in_multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return in_multirun and isinstance(err, Exception) and not isinstance(err, Interrupted)


def _close_wandb() -> None:
    wandb = sys.modules.get("wandb")  # only if something imported it
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """Decorate `task(cfg)` into a console entry point over `conf/<config_name>.yaml`."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig):
            try:
                config_checks.warn_unread_additions(cfg)
                result = task(cfg)
                _record_end()
                return result
            except BaseException as err:
                if isinstance(err, SystemExit) and not err.code:
                    raise  # a task that ends early on purpose
                known = _known_error(err)
                goes_on = _sweep_goes_on(known or err)
                message = str(known) if known is not None else f"{type(err).__name__}: {err}"
                _record_end(known or err, message)
                if known is None and not goes_on:
                    raise  # a bug: Hydra prints its traceback
                if known is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    traceback.print_exc()
                print(f"error: {message}", file=sys.stderr, flush=True)
                if goes_on:
                    return math.nan  # "no value": the next job runs, and Optuna records a failed trial
                sys.exit(known.exit_code)
            finally:
                _close_wandb()

        def main():
            resolvers.register()
            try:  # before Hydra reads the files: it would print a traceback
                config_checks.check_user_config_files(sys.argv[1:])
            except UserError as err:
                exit_with(err)
            for pattern in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(guarded)
            result = app()
            if sweep_callback.failed_sweeps:
                sys.exit(1)  # its summary line said which jobs
            return result

        main.task = task  # the undecorated task, for library use
        return main

    return decorate
