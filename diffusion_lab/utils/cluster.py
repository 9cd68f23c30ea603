"""Where a process sits in a cluster job: its rank, the job's id, and how DDP re-launches it.

Every rank of a `torchrun` or SLURM job runs the whole command, and a requeued SLURM job runs it
again, so anything a command derives from "now" (its run folder) must come from the job instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers import subprocess_script

log = logging.getLogger("diffusion_lab")

# The variables the launchers set: torchrun (RANK), SLURM's srun (SLURM_PROCID) and the per-rank
# copies that Lightning's DDP starts itself (LOCAL_RANK / NODE_RANK).
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_launch_rank_zero() -> bool:
    """True unless a launcher says this process is a rank other than 0 (readable before any
    process group exists, so Hydra's config can use it)."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def cluster_job_id() -> str | None:
    """A name for this job that every rank and every requeue of it agree on; None outside a cluster.

    SLURM: the job id (array job id + task id for array jobs; a requeue keeps both). torchrun: its
    rendezvous id (`--rdzv-id`; the same for every worker and every restart of the job).
    """
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm_{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm_{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun_{run_id}"
    return None


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (`scontrol requeue`); it restarts with the same job id."""
    job = cluster_job_id()
    if job is None or not job.startswith("slurm_"):
        return
    job_id = job.removeprefix("slurm_")
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        problem = result.stderr.strip() if result.returncode else None
    except OSError as err:  # no scontrol on this node
        problem = str(err)
    if problem is None:
        log.warning("requeued SLURM job %s: it resumes from its run folder when it restarts", job_id)
    else:
        log.warning("`scontrol requeue %s` failed (%s); resubmit the same command to resume", job_id, problem)


def _job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that Lightning's DDP runs for each extra rank: this one Hydra job, in its folder.

    Lightning's own version repeats `sys.argv`, which inside a multirun is the whole sweep (`-m` and
    every comma list), so each rank would start the sweep again in a folder of its own
    (lightning-hydra-template issue 393). The job's own overrides and folder make the rank join its job.
    Only training starts DDP ranks, so the entry is always `diffusion_lab.train`.
    """
    hydra = HydraConfig.get()
    # The module, not `sys.argv[0]`: in a joblib or submitit worker that is the worker's own entry.
    command = [
        sys.executable, "-m", "diffusion_lab.train",
        *hydra.overrides.task,
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        "hydra.output_subdir=null",  # rank 0 alone writes the .hydra record
        f"hydra.job.name={hydra.job.name}_rank{local_rank}",
    ]  # fmt: skip
    return command, hydra.runtime.cwd


def ddp_ranks_join_their_job() -> None:
    """Make Lightning start extra DDP ranks with `_job_command`.

    Lightning has no public hook for the command of a DDP rank: its launcher
    (`_SubprocessScriptLauncher._call_children_scripts`) calls the module-level function
    `_hydra_subprocess_cmd(local_rank) -> (command, cwd)` whenever Hydra is in use. This is the one
    place that replaces a private Lightning function; checked against Lightning 2.5 to 2.6.6, and
    tests/utils/test_cluster.py fails if the launcher stops calling it. If a Lightning release drops
    it, single runs still work, and the warning says what a multirun would do.
    """
    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        log.warning(
            "this Lightning version has no _hydra_subprocess_cmd: DDP ranks of a -m sweep would each "
            "rerun the whole sweep; run DDP jobs one at a time or use torchrun/SLURM"
        )
        return
    subprocess_script._hydra_subprocess_cmd = _job_command


# What Lightning's DDP launcher leaves in this process's environment for the ranks it starts.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def one_ddp_group_per_job() -> Iterator[None]:
    """Leave the process as it was after a DDP fit, so the next job of a multirun starts its own group.

    Lightning's launcher writes LOCAL_RANK etc. into this process's environment; a second job would
    read them as "started by an external launcher" and wait for ranks that never come.
    """
    before = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(trainer, module: torch.nn.Module) -> None:
    """After a multi-process fit, every rank must hold the same weights; a run that ends with ranks
    apart would save whichever rank 0 had, so it fails instead."""
    if trainer.world_size < 2:
        return
    digest = parameter_digest(module)
    log.info("rank %d: parameters sha256 %s", trainer.global_rank, digest)
    digests: list = [None] * trainer.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"the DDP ranks ended with different weights (sha256 per rank: {digests})")
