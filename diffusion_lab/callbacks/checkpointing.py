"""Checkpoints that can be trusted: verified after every save, and one more on SIGTERM / SIGINT.

Lightning's own SIGTERM handling ends the run with exit code 0, and its `OnExceptionCheckpoint` saves
whatever state an exception left behind. Here a signal only raises a flag; the checkpoint is taken at
the end of the current training step (a consistent state that resumes exactly), its path is printed,
and the run exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl+C).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.errors import Interrupted
from diffusion_lab.utils.checkpoints import verify_checkpoint
from diffusion_lab.utils.cluster import requeue_slurm_job

log = logging.getLogger("diffusion_lab")


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, then a read-back: a file that is missing or incomplete fails the
    run (the writer can swallow a PermissionError and leave no file behind). A trainer plugin, so it
    checks every save (ModelCheckpoint's and `Preemption`'s); Lightning calls it on global rank 0."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        verify_checkpoint(path)


class VerifiedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves nothing under `fast_dev_run` (Lightning's end-of-training `save_last`
    forgets to check it). The files it writes are verified by `VerifiedCheckpointIO`."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)


class Preemption(Checkpoint):
    """On any of `signals`, save `<dirpath>/interrupted.ckpt` after the current step and stop.

    A `Checkpoint` callback, so Lightning runs its hooks after every other callback's: the saved state
    includes this step's EMA update, and the resumed run continues bit for bit.

    Inside a SLURM job, the `requeue_signals` (the warning sent before the time limit: `--signal=USR1@120`
    in sbatch, SIGUSR2 from submitit) also put the job back in the queue; its run folder is named after
    the job, so the restarted job resumes from this checkpoint. Lightning's own SLURM requeue is off
    (trainer/slurm.yaml): it saves inside the signal handler, in the middle of a step.
    """

    def __init__(
        self,
        dirpath: str,
        signals: tuple[str, ...] = ("SIGTERM", "SIGINT"),
        requeue_signals: tuple[str, ...] = (),
    ):
        self.dirpath = Path(dirpath)
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue_signals = [signal.Signals[name] for name in requeue_signals]
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # a second signal: stop now, the default way
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    # Installed at train start, after Lightning registers its own handlers, so ours replace them.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = "/".join(s.name for s in self.signals)
        log.info("on %s: save %s after the current step, then stop", names, self.dirpath / "interrupted.ckpt")
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        # Every rank must take part in the save: agree on the signal (any rank may have received it).
        received = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if not signum:
            return
        path = self.dirpath / "interrupted.ckpt"
        trainer.save_checkpoint(path)  # verified by VerifiedCheckpointIO
        if trainer.is_global_zero and signum in self.requeue_signals:
            requeue_slurm_job()
        raise Interrupted(signum, trainer.global_step, path, resume_command(self.dirpath.parent))


def resume_command(run_dir: Path) -> str:
    """This command again, resuming from `run_dir` (a resume must repeat the run's overrides)."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "out="))]
    return " ".join(["dlab-train", *overrides, f"ckpt_path={run_dir}"])
