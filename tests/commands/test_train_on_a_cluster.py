"""Scale-out through the installed CLI: DDP on 2 gloo processes inside a multirun, runs that resume
from their folder after a signal (fixed folder, SLURM requeue), and W&B grouping. A resumed run
matching an uninterrupted one bit for bit is also the check that two runs with one seed agree."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.train import objective
from tests.conftest import once_per_session, run_cli, start_training

# A tiny run long enough to interrupt: one long epoch, no validation before it ends.
LONG = ["debug=tiny", "trainer.limit_train_batches=2000", "trainer.max_steps=30"]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def _interrupt(
    args: list[str], cwd: Path, signum: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Start `dlab-train args`, send `signum` a step or two into training, and wait for it."""
    proc = start_training(*args, cwd=cwd, env=env)
    time.sleep(0.5)  # a step or two
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict:
    """The weights of the LONG run without any interruption (trained once for all xdist workers)."""

    def make(cwd: Path) -> None:
        result = run_cli("dlab-train", *LONG, f"out={cwd / 'run'}", cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]

    return _weights(once_per_session(tmp_path_factory, "uninterrupted", make) / "run")


def _assert_same_weights(run_dir: Path, expected: dict) -> None:
    weights = _weights(run_dir)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_multirun_of_ddp_jobs_makes_one_sweep_with_one_folder_per_job(tmp_path):
    """A Hydra multirun of two DDP jobs (2 gloo processes each): one sweep, one folder per job holding
    its own overrides, checkpoint and metrics, and ranks that end with identical weights."""
    args = [
        "-m",
        "trainer=ddp_cpu",
        "debug=tiny",
        "trainer.limit_train_batches=2",
        "conditioning=concat,adaln",
    ]
    result = run_cli("dlab-train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # Lightning started and joined the second rank
    outputs = tmp_path / "outputs" / "debug"
    assert [p.name for p in outputs.iterdir()] == ["multiruns"]  # no run folder of a stray rank
    (sweep,) = (outputs / "multiruns").iterdir()  # one sweep, not one per rank
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, conditioning in (("0", "concat"), ("1", "adaln")):
        assert [p.relative_to(sweep / job) for p in (sweep / job).rglob("config.yaml")] == [
            Path(".hydra/config.yaml")
        ]
        assert f"conditioning={conditioning}" in yaml.safe_load(
            (sweep / job / ".hydra" / "overrides.yaml").read_text()
        )
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
        assert json.loads((sweep / job / "metrics.json").read_text())["val/loss"] > 0
        assert [p.name for p in (sweep / job).glob("*.log")] == ["train.log"]  # rank 0's log only
    assert not list(sweep.rglob("run.lock"))  # rank 0 of each job held its folder's lock, and let it go
    # Each job's two ranks end with identical weights; the two jobs differ.
    digests = re.findall(r"rank (\d): parameters sha256 (\w+)", result.stdout)
    assert sorted(r for r, _ in digests) == ["0", "0", "1", "1"]
    by_hash = {h: sorted(r for r, d in digests if d == h) for _, h in digests}
    assert list(by_hash.values()) == [["0", "1"], ["0", "1"]]


def test_rerunning_a_command_with_a_fixed_run_folder_resumes_where_it_stopped(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = [*LONG, f"hydra.run.dir={run_dir}"]
    stopped = _interrupt(args, tmp_path, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    step = torch.load(run_dir / "checkpoints" / "interrupted.ckpt", weights_only=False)["global_step"]
    assert 1 <= step < 30

    again = run_cli("dlab-train", *args, cwd=tmp_path)  # the very same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/interrupted.ckpt" in again.stdout
    _assert_same_weights(run_dir, uninterrupted)  # (a resume with another config: test_trust.py)


def test_a_requeued_slurm_job_finds_its_run_folder_and_resumes(tmp_path, uninterrupted):
    slurm = {"SLURM_JOB_ID": "4242"}
    stopped = _interrupt(LONG, tmp_path, signal.SIGUSR1, env=slurm)  # SLURM's warning before the limit
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "debug" / "runs" / "slurm_4242"  # named after the job, not the time
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert "scontrol requeue 4242" in stopped.stdout  # tried (no SLURM on this machine)

    requeued = run_cli("dlab-train", *LONG, cwd=tmp_path, env=slurm)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/interrupted.ckpt" in requeued.stdout
    assert [p.name for p in run_dir.parent.iterdir()] == ["slurm_4242"]
    assert list(run_dir.glob(".hydra/rerun_*/config.yaml"))  # the requeue's record, beside the first
    _assert_same_weights(run_dir, uninterrupted)


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_runs_of_a_multirun_share_its_group_and_a_resume_keeps_the_run_id(tmp_path):
    args = ["debug=tiny", "logger=wandb", "trainer.limit_train_batches=2"]
    result = run_cli(
        "dlab-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *args, "seed=1,2",
        cwd=tmp_path, env={"WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    run_ids = []
    for job, seed in (("0", 1), ("1", 2)):
        (offline,) = _offline_runs(sweep / job)
        run_id = (sweep / job / "wandb_id.txt").read_text().strip()
        assert offline.name.endswith(run_id)
        run_ids.append(run_id)
        records = next(offline.glob("run-*.wandb")).read_bytes()
        assert sweep.name.encode() in records  # group = the sweep
        assert f"seed={seed}".encode() in records  # name = the job's overrides
        assert b'"conditioning":{"_target_"' in records  # the resolved config
        assert list((offline / "files" / "media" / "images").glob("samples_*.png"))
    assert len(set(run_ids)) == 2

    resumed = run_cli(
        "dlab-train", *args, "seed=1", "trainer.max_epochs=2", f"ckpt_path={sweep / '0'}",
        cwd=tmp_path, env={"WANDB_MODE": "offline"},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = _offline_runs(sweep / "0")
    assert second.name.endswith(run_ids[0])  # the same W&B run continues


def test_a_sweep_whose_optimized_metric_was_not_logged_is_an_error():
    cfg = OmegaConf.create({"optimized_metric": "val/fid"})
    assert objective({"val/fid": 3.0, "val/loss": 0.1}, cfg, in_sweep=True) == 3.0
    assert objective({"val/loss": 0.1}, cfg, in_sweep=False) is None  # a single run has no sweeper
    with pytest.raises(
        ConfigError, match=r"optimized_metric=val/fid: .* logged \['val/loss'\].*with_metrics"
    ):
        objective({"val/loss": 0.1}, cfg, in_sweep=True)
