"""Multi-process code paths on CPU: DDP with 2 gloo processes, and a Hydra multirun sweep."""

from __future__ import annotations

import json

import torch
import yaml

from tests.conftest import run_cli


def test_ddp_two_cpu_processes(tmp_path):
    result = run_cli(
        "dlab-train", "debug=tiny", "trainer=ddp_cpu", "trainer.limit_train_batches=2", cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output  # Lightning started and joined the second rank
    (run_dir,) = (tmp_path / "outputs" / "debug" / "runs").iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/loss"] > 0


def test_multirun_sweep_writes_one_folder_per_job(tmp_path):
    sweep_args = ["-m", "debug=tiny", "conditioning=concat,adaln", "trainer.limit_train_batches=2"]
    result = run_cli("dlab-train", *sweep_args, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    seen = []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        seen += [o for o in overrides if o.startswith("conditioning=")]
        assert json.loads((job / "metrics.json").read_text())["val/loss"] > 0
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert seen == ["conditioning=concat", "conditioning=adaln"]
