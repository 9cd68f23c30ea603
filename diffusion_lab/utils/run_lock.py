"""One owner per run folder: a lock file taken before anything is written into it.

Two commands given the same `out=` would otherwise both write into it (two `last*.ckpt`, two log
versions, one interleaved log) and both exit 0. The lock, `<folder>/run.lock`, holds the owner's pid,
host and cluster job. A second command stops at once and names the owner. A lock whose pid is dead on
this host (a run killed with `kill -9`) is stale: it is reported and taken over. A requeued SLURM job
(or a restarted torchrun job) runs on another host under the same job id and takes over its own lock.
Under DDP, launch rank 0 holds the lock for all its ranks.

Hydra writes `.hydra/` and the log file before the task runs, so the lock is taken by a Hydra
callback (`conf/hydra/default.yaml`) when the run or sweep starts, and released when the process ends.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion_lab.errors import UserError, exit_with
from diffusion_lab.utils import cluster

LOCK_NAME = "run.lock"
_held: set[Path] = set()  # the locks this process took


class RunFolderBusy(UserError):
    """Another live command owns the run folder."""


def _owner_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": cluster.cluster_job_id(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_owner(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # a half-written or unreadable lock: treated as held by an unknown owner


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (`{owner.get('command', '?')}`, started {owner.get('started', '?')})"


def _may_take_over(owner: dict, lock: Path) -> bool:
    """True when the owner is gone (stale, reported) or is an earlier run of this same cluster job."""
    me = _owner_record()
    if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
        return True
    if me["job"] is not None and owner.get("job") == me["job"]:
        print(f"note: {lock.parent} was locked by an earlier run of job {me['job']} "
              f"({_describe(owner)}); this run takes it over", file=sys.stderr)  # fmt: skip
        return True
    if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
        print(f"warning: removed a stale lock in {lock.parent}: {_describe(owner)} is no longer running "
              "(killed?); its files are kept and this run takes the folder over", file=sys.stderr)  # fmt: skip
        return True
    return False


def acquire(folder: str | Path) -> None:
    """Make `folder` and own it, or raise RunFolderBusy naming the live owner. Ranks other than 0 skip."""
    if not cluster.is_launch_rank_zero():
        return
    folder = Path(folder).resolve()
    lock = folder / LOCK_NAME
    if lock in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # the second try follows the removal of a lock we may take over
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(lock)
            if not _may_take_over(owner, lock):
                raise RunFolderBusy(
                    f"{folder} is in use by {_describe(owner)}. Wait for it to finish, or pass another "
                    f"out=. If that process is gone for good, delete {lock}."
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as file:
            json.dump(_owner_record(), file)
        _held.add(lock)
        return


def release(folder: str | Path | None = None) -> None:
    """Drop this process's lock on `folder` (every lock it holds when None)."""
    locks = list(_held) if folder is None else [Path(folder).resolve() / LOCK_NAME]
    for lock in locks:
        if lock in _held:
            _held.discard(lock)
            if _read_owner(lock).get("pid") == os.getpid():
                lock.unlink(missing_ok=True)


atexit.register(release)  # also on sys.exit after an error; a killed process leaves a stale lock


def _or_exit(folder: str) -> None:
    """Hydra runs callbacks outside the command's error handling: print the one line and exit here."""
    try:
        acquire(folder)
    except RunFolderBusy as err:
        exit_with(err)


class RunFolderLock(Callback):
    """Lock the run folder (a single run) or the sweep folder and each job's folder (a multirun)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(config.hydra.sweep.dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(config.hydra.runtime.output_dir)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode.name == "MULTIRUN":  # a single run keeps its lock until the process ends
            release(config.hydra.runtime.output_dir)
