"""`dlab-report`: a table and plots from a Hydra multirun folder (fake jobs, then a real tiny sweep)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_lab import report
from tests.conftest import run_cli


def make_job(root, num, overrides: list[str], metrics: dict | None):
    """A job folder the way Hydra (.hydra/overrides.yaml) and `dlab-train` (metrics.json) write it."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def test_fake_multirun_lists_every_job_with_its_overrides(tmp_path, capsys):
    make_job(tmp_path, 0, ["conditioning=adaln", "schedule=linear"], {"val/loss": 0.03, "fid": 12.3})
    make_job(tmp_path, 1, ["conditioning=cross_attn", "schedule=cosine"], {"val/loss": 0.05, "fid": 20.0})
    make_job(tmp_path, 2, ["conditioning=concat", "schedule=cosine"], None)  # failed: no metrics.json
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")

    report.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| job | status | conditioning | schedule | fid | val/loss |" in printed
    assert "| 0 | ok | adaln | linear | 12.3 | 0.03 |" in printed
    assert "| 1 | ok | cross_attn | cosine | 20 | 0.05 |" in printed
    assert "| 2 | missing | concat | cosine | — | — |" in printed
    assert printed.split("\n\nwrote")[0] in (tmp_path / "report.md").read_text()

    rows = read_csv(tmp_path / "report.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert rows[1] == {"job": "1", "status": "ok", "conditioning": "cross_attn", "schedule": "cosine",
                       "fid": "20", "val/loss": "0.05"}  # fmt: skip
    assert rows[2]["status"] == "missing" and rows[2]["fid"] == ""
    for name in ["fid.png", "val_loss.png"]:
        assert (tmp_path / "plots" / name).stat().st_size > 5_000


def test_two_varying_keys_and_out_dir(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    grid = [
        (c, s) for c in ["adaln", "concat"] for s in ["linear", "cosine"]
    ] * 3  # 12 jobs: 10 sorts after 9
    for num, (cond, sched) in enumerate(grid):
        make_job(runs, num, [f"conditioning={cond}", f"schedule={sched}", "seed=0"], {"fid": float(num)})
    result = report.write_report(runs, out)
    assert [j.name for j in result["jobs"]] == [str(n) for n in range(12)]
    assert report.varying_keys(result["jobs"]) == ["conditioning", "schedule"]
    assert result["plots"] == [out / "plots" / "fid.png"] and result["plots"][0].stat().st_size > 5_000
    assert not (runs / "report.md").exists() and (out / "report.md").is_file()


def test_override_prefixes_are_not_part_of_the_key():
    assert report.parse_override("+experiment=mnist_cpu") == ("experiment", "mnist_cpu")
    assert report.parse_override("++trainer.max_epochs=2") == ("trainer.max_epochs", "2")
    assert report.parse_override("model.lr=a=b") == ("model.lr", "a=b")


@pytest.mark.parametrize("case", ["does_not_exist", "empty"])
def test_clear_error_without_jobs(tmp_path, capsys, case):
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(folder) in err
    assert ("is not a folder" if case == "does_not_exist" else "holds no jobs") in err


def test_real_tiny_multirun(tmp_path):
    """A real `dlab-train -m` sweep over two schedules, then `dlab-report` on its folder (both as CLIs)."""
    sweep = tmp_path / "sweep"
    train = run_cli("diffusion_lab.train", "-m", "debug=tiny", "trainer.limit_train_batches=1",
                    "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    script = Path(sys.executable).with_name("dlab-report")  # the installed console script
    if not script.is_file():
        pytest.fail(f"dlab-report is not installed next to {sys.executable}; run `pip install -e .`")
    result = subprocess.run([script, sweep], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"], r["schedule"], r["debug"]) for r in rows] == [
        ("0", "ok", "linear", "tiny"),
        ("1", "ok", "cosine", "tiny"),
    ]
    assert all(float(r["val/loss"]) > 0 for r in rows)
    assert "| 0 | ok | tiny |" in result.stdout and (sweep / "plots" / "val_loss.png").is_file()
