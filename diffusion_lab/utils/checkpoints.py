"""Finding, reading and verifying checkpoints, with errors that name the file and the fix."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from diffusion_lab.errors import CheckpointError


def _newest(paths) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written `*.ckpt` in `folder`, or None."""
    return _newest(folder.glob("*.ckpt"))


def find_checkpoint(spec: str, runs_dir: str | Path) -> Path:
    """Turn `last`, a run folder or a `.ckpt` path into an existing checkpoint file.

    `last` is the newest checkpoint of any kind (last, best or interrupted) of any run under `runs_dir`;
    a run folder gives its own newest checkpoint.
    """
    runs_dir = Path(runs_dir)
    if spec == "last":
        path = _newest(runs_dir.glob("*/checkpoints/*.ckpt"))
        if path is None:
            raise CheckpointError(
                f"ckpt_path=last: no run under {runs_dir} has a checkpoint. "
                "Train first, or pass ckpt_path=<run folder or .ckpt file>."
            )
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        newest = _newest([*path.glob("checkpoints/*.ckpt"), *path.glob("*.ckpt")])
        if newest is None:
            raise CheckpointError(
                f"ckpt_path={spec}: the folder {path} holds no checkpoint (looked in checkpoints/*.ckpt). "
                "Pass a run folder that finished at least one validation, a .ckpt file, or `last`."
            )
        return newest
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={spec}: no checkpoint at {path}. Expected a .ckpt file, a run folder holding "
            "checkpoints/*.ckpt, or `last`. Check the path, or drop ckpt_path to start a fresh run."
        )
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The Hydra run folder a checkpoint was written in (`<run>/checkpoints/x.ckpt`)."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def read_checkpoint(path: str | Path) -> dict:
    """`torch.load` on the CPU; a truncated or foreign file is a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "It may be truncated (a run killed while saving, or a full disk). "
            "Pick another checkpoint of the run, or ckpt_path=<run folder> for its newest one."
        ) from err


def verify_checkpoint(path: str | Path) -> None:
    """Raise unless `path` is a complete checkpoint: present, non-empty, every zip member intact."""
    path = Path(path)
    problem = None
    if not path.is_file():
        problem = "the file does not exist"
    elif path.stat().st_size == 0:
        problem = "the file is empty"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None or not any(
                    n.endswith("data.pkl") for n in archive.namelist()
                ):
                    problem = "the file is incomplete"
        except zipfile.BadZipFile:
            problem = "the file is not a PyTorch checkpoint"
    if problem:
        raise CheckpointError(
            f"saving the checkpoint {path} failed: {problem}. Check that {path.parent} is writable "
            "and that the disk has space, then resume from the previous checkpoint."
        )
