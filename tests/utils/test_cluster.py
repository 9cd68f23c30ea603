"""Cluster helpers: job ids every rank agrees on, rank detection, requeue, and DDP bookkeeping."""

from __future__ import annotations

import inspect
import logging
import os

import pytest
import torch
from lightning.pytorch.strategies.launchers import subprocess_script

from diffusion_lab.utils import cluster

CLUSTER_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID",
    "RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK",
)  # fmt: skip


@pytest.fixture
def no_cluster(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "812"}, "slurm_812"),
        # An array task: the array's id and the task's index (what a requeue keeps).
        ({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3"}, "slurm_812_3"),
        ({"TORCHELASTIC_RUN_ID": "exp7"}, "torchrun_exp7"),
        ({"TORCHELASTIC_RUN_ID": "none"}, None),  # torchrun without a rendezvous id
    ],
)
def test_cluster_job_id(no_cluster, variables, expected):
    for name, value in variables.items():
        no_cluster.setenv(name, value)
    assert cluster.cluster_job_id() == expected


@pytest.mark.parametrize(
    ("variables", "rank_zero"),
    [({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3"}, False),
     ({"SLURM_PROCID": "1"}, False), ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False)],
)  # fmt: skip
def test_launch_rank_zero(no_cluster, variables, rank_zero):
    for name, value in variables.items():
        no_cluster.setenv(name, value)
    assert cluster.is_launch_rank_zero() is rank_zero


def test_requeue_without_scontrol_warns_and_goes_on(no_cluster, caplog):
    no_cluster.setenv("SLURM_JOB_ID", "4242")
    no_cluster.setenv("PATH", "/nonexistent")
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        cluster.requeue_slurm_job()
    assert "`scontrol requeue 4242` failed" in caplog.text


def test_requeue_outside_slurm_does_nothing(no_cluster, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        cluster.requeue_slurm_job()
    assert caplog.text == ""


def test_parameter_digest_sees_every_bit():
    net = torch.nn.Linear(3, 2)
    before = cluster.parameter_digest(net)
    assert cluster.parameter_digest(net) == before
    with torch.no_grad():
        net.bias[0] = torch.nextafter(net.bias[0], torch.tensor(1.0))  # one ulp
    assert cluster.parameter_digest(net) != before


def test_one_ddp_group_per_job_restores_the_launch_variables(no_cluster):
    for name in ("MASTER_PORT", "WORLD_SIZE"):
        no_cluster.delenv(name, raising=False)
    no_cluster.setenv("MASTER_ADDR", "node1")
    with cluster.one_ddp_group_per_job():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1234", LOCAL_RANK="0", WORLD_SIZE="2")
    assert os.environ["MASTER_ADDR"] == "node1"
    assert not {"MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)


class _FakeTrainer:
    world_size, global_rank = 2, 0


def _gather_with(other_rank_digest: str | None):
    """A stand-in for `all_gather_object` on 2 ranks: this rank's digest, then the other rank's."""

    def gather(out: list, mine: str) -> None:
        out[:] = [mine, other_rank_digest or mine]

    return gather


def test_ranks_with_different_weights_fail(monkeypatch):
    net = torch.nn.Linear(3, 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", _gather_with("0" * 64))
    with pytest.raises(RuntimeError, match="different weights") as caught:
        cluster.check_ranks_agree(_FakeTrainer(), net)
    assert cluster.parameter_digest(net) in str(caught.value) and "0" * 64 in str(caught.value)


def test_ranks_with_the_same_weights_pass(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_gather_object", _gather_with(None))
    cluster.check_ranks_agree(_FakeTrainer(), torch.nn.Linear(3, 2))


def test_lightning_still_builds_rank_commands_with_the_function_we_replace():
    """`ddp_ranks_join_their_job` replaces a private Lightning function: this fails loudly the day a
    Lightning release renames it, changes its signature or stops calling it."""
    signature = inspect.signature(subprocess_script._hydra_subprocess_cmd)
    assert list(signature.parameters) == ["local_rank"]
    launcher = inspect.getsource(subprocess_script._SubprocessScriptLauncher._call_children_scripts)
    assert "command, cwd = _hydra_subprocess_cmd(local_rank)" in launcher


def test_ddp_ranks_join_their_job_installs_the_job_command(monkeypatch):
    monkeypatch.setattr(subprocess_script, "_hydra_subprocess_cmd", subprocess_script._hydra_subprocess_cmd)
    cluster.ddp_ranks_join_their_job()
    assert subprocess_script._hydra_subprocess_cmd is cluster._job_command


def test_a_lightning_without_the_function_gets_a_warning(monkeypatch, caplog):
    monkeypatch.delattr(subprocess_script, "_hydra_subprocess_cmd")
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        cluster.ddp_ranks_join_their_job()
    assert "would each rerun the whole sweep" in caplog.text
    assert not hasattr(subprocess_script, "_hydra_subprocess_cmd")
