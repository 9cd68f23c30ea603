"""`dlab-report`: a table and plots from a Hydra multirun folder (fake jobs, then a real tiny sweep),
through the installed command."""

from __future__ import annotations

import csv
import json
import math
import re
import signal
from pathlib import Path

import pytest
import yaml

from diffusion_lab import report
from diffusion_lab.errors import DataError, DivergedError, Interrupted
from diffusion_lab.utils.sweeps import parse_override, write_status
from tests.conftest import run_cli


def make_job(root, num, overrides: list[str], metrics: dict | None, error: Exception | None = None):
    """A job folder the way Hydra (.hydra/overrides.yaml), `dlab-train` (metrics.json) and the entry
    wrapper (status.json, once the job ended) write it; no status.json: a job still running or killed."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:  # json.dumps writes NaN / Infinity literals, as dlab-train's json.dump does
        (job / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_status(job)
    if error is not None:
        write_status(job, error, str(error))


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


LONG_ERROR = "training diverged at step 12: the loss is nan. " + "Lower optimizer.lr or use warmup. " * 4


def fake_sweep(root: Path) -> Path:
    """Five jobs, one of each status: ok, failed (a DivergedError), nan (a non-finite metric), missing,
    and interrupted (stopped by SIGTERM)."""
    make_job(root, 0, ["conditioning=adaln", "schedule=linear"], {"val/loss": 0.03, "fid": 12.3})
    make_job(
        root, 1, ["conditioning=cross_attn", "schedule=linear"], None, DivergedError(LONG_ERROR, step=12)
    )
    make_job(root, 2, ["conditioning=concat", "schedule=cosine"], {"val/loss": math.nan, "fid": 20.0})
    make_job(root, 3, ["conditioning=none", "schedule=cosine"], None)  # still running, or killed
    stopped = Interrupted(signal.SIGTERM, 120, root / "4/checkpoints/interrupted.ckpt", "dlab-train seed=4")
    make_job(root, 4, ["conditioning=concat", "schedule=linear"], None, stopped)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_fake_multirun_marks_every_status(tmp_path):
    sweep, out = fake_sweep(tmp_path / "sweep"), tmp_path / "report"
    result = run_cli("dlab-report", f"sweep={sweep}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    assert "| job | status | message | conditioning | schedule | fid | val/loss |" in printed
    assert "| 0 | ok | — | adaln | linear | 12.3 | 0.03 |" in printed
    assert f"| 1 | failed | {LONG_ERROR[:79]}… | cross_attn | linear | — | — |" in printed  # cut to 80
    assert "| 2 | nan | not finite: val/loss | concat | cosine | 20 | nan |" in printed
    assert "| 3 | missing | — | none | cosine | — | — |" in printed
    assert "| 4 | interrupted | stopped by SIGTERM at step 120; saved " in printed
    assert "5 jobs: 1 ok, 1 interrupted, 1 failed, 1 nan, 1 missing" in printed
    assert f"wrote report.md, report.csv and 2 plot(s) to {out}" in printed
    md = (out / "report.md").read_text()
    assert (
        printed.split("\n\n5 jobs")[0] in md
        and "5 jobs: 1 ok, 1 interrupted, 1 failed, 1 nan, 1 missing" in md
    )

    rows = read_csv(out / "report.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "nan", "missing", "interrupted"]  # jobs 0 to 4
    assert rows[1]["message"] == LONG_ERROR  # whole in the CSV
    assert rows[0] == {"job": "0", "status": "ok", "message": "", "conditioning": "adaln", "schedule": "linear",
                       "fid": "12.3", "val/loss": "0.03"}  # fmt: skip
    for name in ["fid.png", "val_loss.png"]:
        assert (out / "plots" / name).stat().st_size > 5_000
    assert not (sweep / "report.md").exists()


def test_nan_metrics_are_not_plotted(tmp_path):
    jobs = report.load_jobs(fake_sweep(tmp_path / "sweep"))
    assert [j.status for j in jobs] == ["ok", "failed", "nan", "missing", "interrupted"]
    assert report.summary(jobs) == "5 jobs: 1 ok, 1 interrupted, 1 failed, 1 nan, 1 missing"
    assert [j.name for j in report.finite_jobs(jobs, "val/loss")] == ["0"]  # job 2's NaN gets no bar
    assert [j.name for j in report.finite_jobs(jobs, "fid")] == ["0", "2"]
    make_job(tmp_path / "all_nan", 0, ["seed=0"], {"val/loss": math.inf})
    result = report.write_report(tmp_path / "all_nan", tmp_path / "out")
    assert result["plots"] == [] and [j.status for j in result["jobs"]] == ["nan"]


def test_truncated_metrics_json_is_a_failed_job(tmp_path):
    make_job(tmp_path, 0, ["seed=0"], None)
    (tmp_path / "0" / "metrics.json").write_text('{"val/loss": 0.')  # killed while writing
    (job,) = report.load_jobs(tmp_path)
    assert job.status == "failed" and job.message.startswith("metrics.json is not valid JSON")


def test_status_comes_from_status_json_and_old_sweeps_from_error_txt(tmp_path):
    """status.json decides, whatever error.txt says; a job folder from before status.json existed
    failed if it holds an error.txt, whose wording is never parsed."""
    stopped = Interrupted(signal.SIGTERM, 7, tmp_path / "interrupted.ckpt", "dlab-train")
    make_job(tmp_path, 0, ["seed=0"], None, stopped)
    (tmp_path / "0" / "error.txt").write_text("this line is for people\n")
    make_job(tmp_path, 1, ["seed=1"], {"val/loss": 0.1})
    (tmp_path / "1" / "error.txt").write_text("an error.txt left by an earlier, failed try\n")
    make_job(tmp_path, 2, ["seed=2"], None)
    (tmp_path / "2" / "error.txt").write_text(str(stopped) + "\n")
    make_job(tmp_path, 3, ["seed=3"], None)
    (tmp_path / "3" / "error.txt").write_text("ValueError: boom\n")
    jobs = report.load_jobs(tmp_path)
    assert [(j.status, j.message) for j in jobs] == [
        ("interrupted", str(stopped)), ("ok", ""), ("failed", str(stopped)), ("failed", "ValueError: boom"),
    ]  # fmt: skip


def test_two_varying_keys(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    # 12 jobs, so that job 10 must sort after job 9
    grid = [(c, s) for c in ["adaln", "concat"] for s in ["linear", "cosine"]] * 3
    for num, (cond, sched) in enumerate(grid):
        make_job(runs, num, [f"conditioning={cond}", f"schedule={sched}", "seed=0"], {"fid": float(num)})
    result = report.write_report(runs, out)
    assert [j.name for j in result["jobs"]] == [str(n) for n in range(12)]
    assert report.varying_keys(result["jobs"]) == ["conditioning", "schedule"]
    assert result["plots"] == [out / "plots" / "fid.png"] and result["plots"][0].stat().st_size > 5_000


def test_override_prefixes_are_not_part_of_the_key():
    assert parse_override("+experiment=mnist_cpu") == ("experiment", "mnist_cpu")
    assert parse_override("++trainer.max_epochs=2") == ("trainer.max_epochs", "2")
    assert parse_override("model.lr=a=b") == ("model.lr", "a=b")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sweep={tmp}/gone"], "sweep={tmp}/gone: no such folder. Expected a Hydra multirun folder"),
        ([], "sweep=<multirun folder> is required, e.g. dlab-report sweep=outputs/train/multiruns/"),
    ],
    ids=["missing_folder", "no_sweep"],
)
def test_clear_error_without_a_sweep(tmp_path, args, expected):
    result = run_cli("dlab-report", *(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(tmp=tmp_path)), result.stderr
    (run_dir,) = (tmp_path / "outputs" / "report" / "runs").iterdir()  # the default out: a run folder
    assert (run_dir / "error.txt").read_text().startswith(expected.format(tmp=tmp_path))


def test_a_folder_without_jobs_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"sweep={tmp_path}: the folder holds no jobs")):
        report.load_jobs(tmp_path)


def test_real_tiny_multirun(tmp_path):
    """A real `dlab-train -m` sweep over two schedules, then `dlab-report` on its folder."""
    sweep = tmp_path / "sweep"
    train = run_cli("dlab-train", "-m", "debug=tiny", "trainer.limit_train_batches=1",
                          "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    result = run_cli("dlab-report", f"sweep={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / "report" / "runs").iterdir()  # the default: a run folder
    rows = read_csv(out / "report.csv")
    assert [(r["job"], r["status"], r["schedule"], r["debug"]) for r in rows] == [
        ("0", "ok", "linear", "tiny"),
        ("1", "ok", "cosine", "tiny"),
    ]
    assert all(float(r["val/loss"]) > 0 for r in rows)
    assert "| 0 | ok | — | tiny |" in result.stdout and (out / "plots" / "val_loss.png").is_file()
    assert "2 jobs: 2 ok, 0 interrupted, 0 failed, 0 nan, 0 missing" in result.stdout
