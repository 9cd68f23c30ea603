"""Finding the checkpoint a user asked to resume or sample from."""

from __future__ import annotations

from pathlib import Path


def find_checkpoint(spec: str, runs_dir: str | Path) -> Path:
    """Turn `last`, a run folder or a `.ckpt` path into an existing checkpoint file.

    `last` means the newest run under `runs_dir` that has `checkpoints/last.ckpt`.
    """
    runs_dir = Path(runs_dir)
    if spec == "last":
        candidates = sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path=last: no run under {runs_dir} has checkpoints/last.ckpt. "
                "Train first, or pass ckpt_path=<run folder or .ckpt file>."
            )
        return candidates[-1]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={spec}: no checkpoint at {path}. Expected a .ckpt file, a run folder holding "
            "checkpoints/last.ckpt, or `last`. Check the path, or drop ckpt_path to start a fresh run."
        )
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The Hydra run folder a checkpoint was written in (`<run>/checkpoints/x.ckpt`)."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
