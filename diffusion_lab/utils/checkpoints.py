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


def _run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run: `checkpoints/*.ckpt`, and `*.ckpt` beside them for a bare folder."""
    return [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("*.ckpt")]


def find_checkpoint(spec: str, runs_dir: str | Path) -> Path:
    """Turn `last`, a run folder or a `.ckpt` path into an existing checkpoint file.

    `last` is the newest checkpoint of any kind (last, best or interrupted) of the runs under `runs_dir`
    only (a command's `outputs/train/runs` in the folder it runs from); a run folder gives its own newest.
    """
    runs_dir = Path(runs_dir)
    if spec == "last":
        path = _newest(runs_dir.glob("*/checkpoints/*.ckpt"))
        if path is None:
            raise CheckpointError(
                f"ckpt_path=last: no run under {runs_dir} has a checkpoint (`last` searches only there, "
                "the outputs/train/runs of the folder you run from). Train first, or pass "
                "ckpt_path=<run folder or .ckpt file> for a run elsewhere."
            )
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        newest = _newest(_run_checkpoints(path))
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


def step_checkpoint(run_dir: Path, step: int, key: str) -> Path:
    """The checkpoint a run saved at global step `step` (`checkpoints/step_<step>.ckpt`, the name
    ModelCheckpoint gives it); `key` is the argument that asked, named in the error."""
    path = run_dir / "checkpoints" / f"step_{step:07d}.ckpt"
    if not path.is_file():
        saved = sorted(
            int(p.stem[5:]) for p in run_dir.glob("checkpoints/step_*.ckpt") if p.stem[5:].isdigit()
        )
        raise CheckpointError(
            f"{key}={step}: {run_dir} saved no checkpoint at step {step}; its steps are "
            f"{', '.join(map(str, saved)) or 'none'}. Pick one, or pass a .ckpt file or another run folder "
            "(train with +callbacks.model_checkpoint.every_n_train_steps=<k> to keep earlier steps)."
        )
    return path


def picked_line(spec: str, path: Path, runs_dir: str | Path) -> str:
    """The line that names the checkpoint `ckpt_path=spec` picked, and for `last` where it searched."""
    if spec == "last":
        return f"ckpt_path=last: newest under {runs_dir}: {path}"
    if Path(spec).expanduser().is_dir():
        return f"ckpt_path={spec}: newest in that run: {path}"
    return f"ckpt_path={path}"


def run_dir_of(checkpoint: Path) -> Path:
    """The Hydra run folder a checkpoint was written in (`<run>/checkpoints/x.ckpt`, or a post-hoc EMA one's
    `<run>/post_hoc_ema/sigma_rel_x.ckpt`)."""
    checkpoint = checkpoint.resolve()
    inside = checkpoint.parent.name in ("checkpoints", "post_hoc_ema")
    return checkpoint.parent.parent if inside else checkpoint.parent


def read_checkpoint(path: str | Path) -> dict:
    """`torch.load` on the CPU; a truncated or foreign file is a CheckpointError naming it and the run's
    newest checkpoint that is intact."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {_first_sentence(err)}). "
            f"It may be truncated (a run killed while saving, or a full disk). {_instead(Path(path))}"
        ) from err


def _first_sentence(err: Exception) -> str:
    """torch's zip errors go on for several sentences of advice: the first says what failed."""
    return str(err).splitlines()[0].split(". ")[0].rstrip(".")


def _instead(bad: Path) -> str:
    """What to pass instead of the unreadable `bad`: the newest intact checkpoint of its run, by name."""
    run_dir = run_dir_of(bad)
    others = sorted(
        (p for p in _run_checkpoints(run_dir) if p.resolve() != bad.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    good = next((p for p in others if _problem(p) is None), None)
    if good is None:
        return f"The run {run_dir} has no other intact checkpoint: pass a checkpoint of another run."
    return f"The newest intact checkpoint of the run is {good.name}: pass ckpt_path={good}"


def _problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (present, non-empty, every zip member intact), or None."""
    if not path.is_file():
        return "the file does not exist"
    if path.stat().st_size == 0:
        return "the file is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            intact = archive.testzip() is None and any(n.endswith("data.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
        return "the file is not a PyTorch checkpoint"
    return None if intact else "the file is incomplete"


def verify_checkpoint(path: str | Path) -> None:
    """Raise unless `path` is a complete checkpoint: present, non-empty, every zip member intact."""
    path = Path(path)
    problem = _problem(path)
    if problem:
        raise CheckpointError(
            f"saving the checkpoint {path} failed: {problem}. Check that {path.parent} is writable "
            "and that the disk has space, then resume from the previous checkpoint."
        )
