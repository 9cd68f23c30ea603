"""Post-hoc EMA (EDM2): keep two power-function EMAs of the weights while training, save them every few
steps, and rebuild the EMA of any length from those snapshots after training.

`PostHocEMA` (turned on by `dlab-train callbacks=post_hoc_ema`) updates its averages after every optimizer
step and writes `<run>/post_hoc_ema/step_<step>.pt` (float32, or float16: see DTYPES) every `every_n_steps`
and at the end of training; the averages and their step also travel in the Lightning checkpoint, so a
resumed run continues them exactly.
`write_post_hoc_checkpoint` (`dlab-phema`) and `post_hoc_module` (`dlab-eval`) turn the snapshots into a
normal checkpoint of one EMA length. The maths is in `utils/post_hoc_ema.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from rich.progress import track

from diffusion_lab.callbacks.checkpointing import VerifiedCheckpointIO
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.inference import load_module
from diffusion_lab.utils.checkpoints import find_checkpoint, picked_line, read_checkpoint, run_dir_of
from diffusion_lab.utils.post_hoc_ema import (
    SNAPSHOT_FORMAT,
    ema_beta,
    gamma_to_sigma_rel,
    load_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
)

log = logging.getLogger("diffusion_lab")

FOLDER = "post_hoc_ema"  # in the run folder: the snapshots and the checkpoints rebuilt from them
# What a snapshot may store its averages as. float16 halves the files, but measured on the default model
# (400 steps, 16 snapshots) it moves the rebuilt weights by 2e-4 of their norm at sigma_rel 0.05-0.25 and by
# 0.7-1.5e-3 at 0.03-0.02 (short lengths combine the snapshots with large coefficients), where the step from
# 0.05 to 0.075 is 1.2e-3, and it triples the error of rebuilding the tracked 0.05 from the 0.10 profile
# alone (1.2e-4 -> 3.5e-4). So float32 is the default; float16 suits lengths of 0.075 and longer.
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def averaged_names(pl_module: L.LightningModule) -> list[str]:
    """The state_dict keys of the trained weights: floating parameters that require a gradient. Buffers
    (the schedule's tables) and frozen weights (a pretrained text backbone) do not change with training:
    a rebuilt checkpoint takes them from the run's own checkpoint, as EDM2 copies buffers."""
    tensors = pl_module.state_dict(keep_vars=True)
    return [
        name
        for name, value in tensors.items()
        if isinstance(value, torch.nn.Parameter) and value.requires_grad and value.is_floating_point()
    ]


class PostHocEMA(L.Callback):
    """Power-function EMAs of the trained weights, one per `sigma_rels`, saved every `every_n_steps`."""

    def __init__(
        self, dirpath: str, sigma_rels=(0.05, 0.10), every_n_steps: int = 150, dtype: str = "float32"
    ):
        if dtype not in DTYPES:
            raise ConfigError(
                f"callbacks.post_hoc_ema.dtype={dtype!r}: expected float32 or float16 (half the size)"
            )
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(
                f"callbacks.post_hoc_ema.every_n_steps={every_n_steps}: expected a positive whole number of "
                "optimizer steps between snapshots, e.g. 150."
            )
        self.dirpath = Path(dirpath)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.every_n_steps = every_n_steps
        self.dtype = DTYPES[dtype]
        self.step = 0  # the optimizer step the averages include
        self.averages: list[dict[str, torch.Tensor]] | None = None
        self._saved_step = 0

    # ---- training ------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step == self.step:  # no optimizer step this batch (gradient accumulation)
            return
        current = pl_module.state_dict()
        names = averaged_names(pl_module)
        if self.averages is None:
            self.averages = [{n: current[n].detach().clone() for n in names} for _ in self.sigma_rels]
        elif self.averages[0].keys() != set(names):
            raise ConfigError(
                "callbacks.post_hoc_ema: the checkpoint's post-hoc EMA averages other weights than this model "
                "trains. Resume with the model config of the run (or start a new run)."
            )
        for average, gamma in zip(self.averages, self.gammas, strict=True):
            keys = list(average)
            ours = [average[n] for n in keys]
            if ours[0].device != current[keys[0]].device:  # restored from a checkpoint on the CPU
                ours = [t.to(current[keys[0]].device) for t in ours]
                average.update(zip(keys, ours, strict=True))
            torch._foreach_lerp_(ours, [current[n] for n in keys], 1.0 - ema_beta(step, gamma))
        self.step = step
        if step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # the averages of the last step, whatever every_n_steps

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or self.averages is None or self._saved_step == self.step:
            return
        self._saved_step = self.step
        if not trainer.is_global_zero:  # every rank holds the same averages (DDP keeps the weights equal)
            return
        snapshot = {
            "format": SNAPSHOT_FORMAT,
            "step": self.step,
            "sigma_rels": self.sigma_rels,
            "gammas": self.gammas,
            "averages": [
                {n: t.detach().to("cpu", self.dtype) for n, t in average.items()} for average in self.averages
            ],
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        VerifiedCheckpointIO().save_checkpoint(snapshot, self.dirpath / f"step_{self.step:07d}.pt")

    # ---- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "sigma_rels": self.sigma_rels, "averages": self.averages}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["sigma_rels"] != self.sigma_rels:
            raise ConfigError(
                f"callbacks.post_hoc_ema.sigma_rels={self.sigma_rels}: the run being resumed kept "
                f"{state_dict['sigma_rels']}. Resume with the same lengths (or start a new run)."
            )
        self.step = self._saved_step = state_dict["step"]
        self.averages = state_dict["averages"]


# ---- after training: checkpoints of any EMA length ------------------------------------------------------
def snapshot_folder(checkpoint: Path) -> Path:
    """`<run>/post_hoc_ema` of the run a checkpoint belongs to (also for a checkpoint rebuilt in there)."""
    return run_dir_of(checkpoint) / FOLDER


def usable_snapshots(checkpoint_path: Path, checkpoint: dict) -> list[dict]:
    """The snapshots of the checkpoint's run up to its step, or a CheckpointError that says why none."""
    folder = snapshot_folder(checkpoint_path)
    snapshots = load_snapshots(folder)
    if not snapshots:
        raise CheckpointError(
            f"{folder} holds no post-hoc EMA snapshots (step_*.pt): the run was trained without them. "
            "Train with `dlab-train callbacks=post_hoc_ema` to keep them."
        )
    step = checkpoint.get("global_step", 0)
    if snapshots[0]["step"] > step:
        raise CheckpointError(
            f"{checkpoint_path} is at step {step}, before the first post-hoc EMA snapshot in {folder} "
            f"(step {snapshots[0]['step']}). Pass a later checkpoint of the run."
        )
    return [s for s in snapshots if s["step"] <= step]


def write_post_hoc_checkpoint(
    checkpoint: dict, folder: Path, sigma_rel: float, snapshots: list[dict]
) -> tuple[Path, dict]:
    """(`folder/sigma_rel_<x>.ckpt`, its `post_hoc_ema` entry): `checkpoint` with its `state_dict`'s trained
    weights replaced by the post-hoc EMA of `sigma_rel` at the newest of `snapshots`, and a `post_hoc_ema`
    entry that says which (verified after writing)."""
    weights, coefficients = reconstruct(snapshots, sigma_rel)
    state = checkpoint["state_dict"]
    missing = sorted(set(weights) - set(state))
    if missing:
        raise CheckpointError(
            f"the snapshots in {folder} hold weights that the run's checkpoint lacks ({', '.join(missing[:3])}): "
            "they are from another model. Pass a checkpoint of the run that saved them."
        )
    entry = {
        "sigma_rel": sigma_rel,
        "gamma": sigma_rel_to_gamma(sigma_rel),
        "step": snapshots[-1]["step"],
        "snapshots": [Path(s["path"]).name for s in snapshots],
        "coefficients": coefficients.tolist(),
        "tracked": [gamma_to_sigma_rel(g) for g in snapshots[-1]["gammas"]],
    }
    rebuilt = state | {n: w.to(state[n].dtype) for n, w in weights.items()}
    out = folder / f"sigma_rel_{sigma_rel:g}.ckpt"
    VerifiedCheckpointIO().save_checkpoint(checkpoint | {"state_dict": rebuilt, "post_hoc_ema": entry}, out)
    return out, entry


def post_hoc_checkpoints(
    ckpt_path, sigma_rels, runs_dir="outputs/train/runs"
) -> tuple[Path, list[tuple[Path, dict]]]:
    """(the checkpoint `ckpt_path` picked: a run folder, a .ckpt or `last`; what `write_post_hoc_checkpoint`
    returns for each of `sigma_rels`), rebuilt at the run's newest snapshot up to the checkpoint's step."""
    lengths = [float(s) for s in sigma_rels]
    for sigma_rel in lengths:  # every length checked before any file is read
        sigma_rel_to_gamma(sigma_rel)
    path = find_checkpoint(str(ckpt_path), runs_dir)
    log.info(picked_line(str(ckpt_path), path, runs_dir))
    checkpoint = read_checkpoint(path)
    snapshots = usable_snapshots(path, checkpoint)
    written = [
        write_post_hoc_checkpoint(checkpoint, snapshot_folder(path), sigma_rel, snapshots)
        for sigma_rel in track(lengths, description="post-hoc EMA", disable=len(lengths) < 2)
    ]
    return path, written


def post_hoc_module(ckpt_path, sigma_rel: float, device="cpu", runs_dir="outputs/train/runs"):
    """(the module with the post-hoc EMA weights of `sigma_rel`, eval mode, on `device`; the checkpoint
    written for it), for `ckpt_path` = a run folder, a .ckpt or `last`, like `inference.load_module`."""
    _, [(written, _)] = post_hoc_checkpoints(ckpt_path, [sigma_rel], runs_dir)
    return load_module(written, device, runs_dir)
