"""A run folder has one owner: the lock file, its stale and cluster take-overs, and two real commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from diffusion_lab.utils import run_lock
from diffusion_lab.utils.run_lock import LOCK_NAME, RunFolderBusy, acquire, release
from tests.conftest import run_cli, start_training

HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    for name in (
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
        "TORCHELASTIC_RUN_ID",
        "RANK",
        "LOCAL_RANK",
        "SLURM_PROCID",
    ):
        monkeypatch.delenv(name, raising=False)
    yield
    release()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant_lock(folder, **owner) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"command": "dlab-train", "started": "then", **owner}))


def _owner(folder) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def test_the_lock_holds_this_process_and_is_released(tmp_path):
    acquire(tmp_path / "run")
    assert _owner(tmp_path / "run")["pid"] == os.getpid()
    assert _owner(tmp_path / "run")["host"] == HOST
    acquire(tmp_path / "run")  # the same process again (a run, then its job callback) is fine
    release(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_owner_on_this_host_keeps_the_folder(tmp_path):
    parent = os.getppid()  # alive for the whole test
    _plant_lock(tmp_path, pid=parent, host=HOST, job=None)
    with pytest.raises(RunFolderBusy, match=rf"in use by pid {parent} on {HOST}.*delete .*{LOCK_NAME}"):
        acquire(tmp_path)
    assert _owner(tmp_path)["pid"] == parent  # untouched


def test_a_dead_owner_on_this_host_is_reported_and_taken_over(tmp_path, capsys):
    dead = _dead_pid()
    _plant_lock(tmp_path, pid=dead, host=HOST, job=None)
    acquire(tmp_path)
    assert _owner(tmp_path)["pid"] == os.getpid()
    assert f"stale lock in {tmp_path}: pid {dead} on {HOST}" in capsys.readouterr().err


def test_an_owner_on_another_host_cannot_be_checked_so_it_keeps_the_folder(tmp_path):
    _plant_lock(tmp_path, pid=_dead_pid(), host="node-17", job=None)
    with pytest.raises(RunFolderBusy, match="on node-17"):
        acquire(tmp_path)


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_host(tmp_path, monkeypatch, capsys):
    _plant_lock(tmp_path, pid=123, host="node-17", job="slurm_4242")
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: refused
    with pytest.raises(RunFolderBusy):
        acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    acquire(tmp_path)
    assert _owner(tmp_path)["job"] == "slurm_4242" and _owner(tmp_path)["host"] == HOST
    assert "earlier run of job slurm_4242" in capsys.readouterr().err


def test_ranks_other_than_zero_leave_the_lock_to_rank_zero(tmp_path, monkeypatch):
    _plant_lock(tmp_path, pid=os.getppid(), host=HOST, job=None)  # rank 0's
    monkeypatch.setenv("LOCAL_RANK", "1")
    acquire(tmp_path)  # no error, nothing written
    assert _owner(tmp_path)["pid"] == os.getppid()


def test_release_leaves_a_lock_that_another_process_has_taken_over(tmp_path):
    acquire(tmp_path)
    _plant_lock(tmp_path, pid=os.getppid(), host=HOST, job=None)
    release(tmp_path)
    assert _owner(tmp_path)["pid"] == os.getppid()
    assert not run_lock._held


@pytest.mark.slow
def test_two_commands_on_one_out_folder_and_a_killed_owner(tmp_path):
    out = tmp_path / "X"
    first = start_training(
        "debug=tiny", "trainer.limit_train_batches=2000", "seed=1", f"out={out}", cwd=tmp_path
    )
    try:
        second = run_cli("dlab-train", "debug=tiny", "seed=2", f"out={out}", cwd=tmp_path)
        assert second.returncode == 1, second.stderr[-3000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {out} is in use by pid {first.pid} on {HOST}"), line
        # The refused command wrote nothing: no second record, log version or log file, no error.txt.
        assert not list(out.glob(".hydra/rerun_*")) and not (out / "error.txt").exists()
        assert [p.name for p in (out / "csv").iterdir()] == ["version_0"]
        assert sorted(p.name for p in out.glob("*.log")) == ["train.log"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Every command takes the lock (here dlab-sample): the killed owner's lock is reported and taken over,
    # and released when the command ends, even on an error (the killed run saved no checkpoint).
    third = run_cli("dlab-sample", f"ckpt_path={out}", f"out={out}", cwd=tmp_path)
    assert f"removed a stale lock in {out}: pid {first.pid} on {HOST} (" in third.stderr
    assert "is no longer running" in third.stderr
    assert third.returncode == 1 and f"ckpt_path={out}: the folder {out} holds no checkpoint" in third.stderr
    assert not (out / LOCK_NAME).exists()
