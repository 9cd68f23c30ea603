"""The entry wrapper that every console script shares.

Each command is a Hydra app over `conf/<name>.yaml`, so they share one vocabulary: `key=value`
overrides, unknown keys rejected, `ckpt_path=` to read a checkpoint, `out=` for the folder written,
`paths.*` for the rest, and `--help`. The wrapper registers our resolvers, silences warnings that do
not apply to us, closes W&B, and turns known errors (`diffusion_lab.errors.UserError`) into one line
and an exit code, with the traceback only when `HYDRA_FULL_ERROR=1`. A failed command leaves
`error.txt` in its run folder, so a sweep report can tell failed jobs from unfinished ones.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from diffusion_lab import CONFIG_DIR
from diffusion_lab.errors import UserError
from diffusion_lab.utils import resolvers

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
def _record_failure(message: str) -> None:
    out = _output_dir()
    if out is not None and out.is_dir():
        (out / "error.txt").write_text(message + "\n")


@rank_zero_only
def _clear_failure() -> None:
    out = _output_dir()
    if out is not None:
        (out / "error.txt").unlink(missing_ok=True)


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
                result = task(cfg)
                _clear_failure()  # e.g. a resume that finished what an interrupted run began
                return result
            except BaseException as err:
                known = _known_error(err)
                if known is None:
                    if not (isinstance(err, SystemExit) and not err.code):
                        _record_failure(f"{type(err).__name__}: {err}")
                    raise
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    traceback.print_exc()
                message = str(known)
                _record_failure(message)
                print(f"error: {message}", file=sys.stderr, flush=True)
                sys.exit(known.exit_code)
            finally:
                _close_wandb()

        def main():
            resolvers.register()
            for pattern in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(guarded)()

        main.task = task  # the undecorated task, for library use
        return main

    return decorate
