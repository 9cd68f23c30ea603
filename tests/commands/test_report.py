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
from diffusion_lab.errors import ConfigError, DataError, DivergedError, Interrupted
from diffusion_lab.metrics import provenance as prov
from diffusion_lab.utils.sweeps import parse_override, write_status
from tests.conftest import assert_one_line_error, run_cli


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


# ---------------------------------------------------------------------------------------------------------
# dlab-eval sweeps: a row per job and guidance key, provenance checked
# ---------------------------------------------------------------------------------------------------------

EXTRACTOR = {"name": "MNISTClassifier", "feature_dim": 128, "sha256": "ab12cd34" + "0" * 56}
REFERENCE = {"name": "mnist", "split": "test", "size": 10000, "sha256": "5e" * 32, "floor_against": "holdout",
             "holdout_size": 10000, "fid_real_floor": 0.5, "fid_real_floor_n": 1000}  # fmt: skip
CODE = {"version": "0.1.0", "commit": "0123456789abcdef", "dirty": False}


def eval_results(n: int = 1000, fids=(3.0, 2.0), extractor=EXTRACTOR, sigma_rel=None) -> dict:
    """What dlab-eval writes to eval.json for guidance [1.0, 2.0] with DDIM at 20 steps (two scores per row
    and the per-class list, which the table leaves out), with its provenance."""
    scales = {"1.0": 1.0, "2.0": 2.0}
    rows = {key: {"fid": fid, "kid_mean": fid / 1000, "accuracy": 0.9 + scale / 20, "per_class_accuracy": [0.9] * 10,
                  "fid_real_floor": 0.5, "fid_real_floor_n": n, "n": n}
            for (key, scale), fid in zip(scales.items(), fids, strict=True)}  # fmt: skip
    record = prov.provenance(
        n=n, seed=0, batch_size=500, extractor=extractor, reference=REFERENCE,
        sampler=prov.sampler_record("DDIMSampler", 20, {k: prov.nfe("ddim", 20, "cfg", s) for k, s in scales.items()}),
        guidance=prov.guidance_record("cfg", scales), ema=prov.ema_record({"callbacks": {"ema": {"decay": 0.999}}}, sigma_rel),
        checkpoint=prov.checkpoint_record("/runs/a/checkpoints/last.ckpt", 2300), code=CODE,
    )  # fmt: skip
    return {"checkpoint": "/runs/a/checkpoints/last.ckpt", "n": n, "sampler": {"name": "DDIMSampler", "steps": 20},
            "guidance": rows, "fid_real_floor": 0.5, "steps": {}, "provenance": record}  # fmt: skip


def make_eval_job(root: Path, num: int, overrides: list[str], results: dict) -> None:
    """A job folder the way a `dlab-eval -m` job leaves it: .hydra/overrides.yaml, eval.json, status.json."""
    make_job(root, num, overrides, None)
    (root / str(num) / "eval.json").write_text(json.dumps(results, indent=2))
    write_status(root / str(num))


def test_eval_sweep_tabulates_a_row_per_guidance_key(tmp_path):
    sweep = tmp_path / "sweep"
    make_eval_job(sweep, 0, ["ckpt_path=a"], eval_results(fids=(3.0, 2.0)))
    make_eval_job(sweep, 1, ["ckpt_path=b"], eval_results(fids=(2.5, 1.5), sigma_rel=0.1))
    make_job(sweep, 2, ["ckpt_path=c"], None, DataError("no such checkpoint"))
    result = report.write_report(sweep, tmp_path / "out")
    assert result["markdown"].splitlines()[:7] == [
        "| job | status | message | ckpt_path | guidance | NFE | EMA | fid | kid_mean | accuracy | fid_real_floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| 0 | ok | — | a | 1.0 | 20 | ema 0.999 | 3 | 0.003 | 0.95 | 0.5 |",
        "| 0 | ok | — | a | 2.0 | 40 | ema 0.999 | 2 | 0.002 | 1 | 0.5 |",
        "| 1 | ok | — | b | 1.0 | 20 | post_hoc 0.1 | 2.5 | 0.0025 | 0.95 | 0.5 |",
        "| 1 | ok | — | b | 2.0 | 40 | post_hoc 0.1 | 1.5 | 0.0015 | 1 | 0.5 |",
        "| 2 | failed | no such checkpoint | c | — | — | — | — | — | — | — |",
    ]
    assert result["markdown"].split("|\n\n", 1)[1] == (
        "Scored by MNISTClassifier (feature dim 128, sha256 ab12cd34…) against mnist test (10000 images, "
        "sha256 5e5e5e5e…)\n\nEvery row: N 1000, sampler DDIMSampler, steps 20, guidance kind cfg, "
        "ckpt step 2300, seed 0, code 01234567\n"
    )
    assert "*" not in result["markdown"] and result["summary"].startswith(
        "3 jobs: 2 ok, 0 interrupted, 1 failed"
    )
    rows = read_csv(result["csv"])
    assert [(r["job"], r["guidance"], r["fid"]) for r in rows] == [
        ("0", "1.0", "3"), ("0", "2.0", "2"), ("1", "1.0", "2.5"), ("1", "2.0", "1.5"), ("2", "", ""),
    ]  # fmt: skip
    assert [p.name for p in result["plots"]] == [
        "fid.png",
        "kid_mean.png",
        "accuracy.png",
        "fid_real_floor.png",
    ]


def test_post_hoc_ema_lengths_are_rows_of_their_own(tmp_path):
    """eval.json's `ema` ({σ_rel: {guidance key: row}}, dlab-eval ema=[0.05]) after the checkpoint's rows."""
    results = eval_results()
    results["ema"] = {"0.05": eval_results(fids=(2.2, 1.2))["guidance"]}
    make_eval_job(tmp_path, 0, ["ema=[0.05]"], results)
    lines = report.write_report(tmp_path, tmp_path / "out")["markdown"].splitlines()
    assert (
        lines[0]
        == "| job | status | message | ema | guidance | NFE | EMA | fid | kid_mean | accuracy | fid_real_floor |"
    )
    assert [line.split(" | ")[4:8] for line in lines[2:6]] == [
        ["1.0", "20", "ema 0.999", "3"], ["2.0", "40", "ema 0.999", "2"],
        ["1.0", "20", "post_hoc 0.05", "2.2"], ["2.0", "40", "post_hoc 0.05", "1.2"],
    ]  # fmt: skip


def test_eval_rows_whose_n_differs_are_starred(tmp_path):
    make_eval_job(tmp_path, 0, ["n=1000"], eval_results(n=1000))
    make_eval_job(tmp_path, 1, ["n=5000"], eval_results(n=5000))
    make_eval_job(tmp_path, 2, ["n=1000"], eval_results(n=1000, fids=(4.0, 3.0)))
    lines = report.write_report(tmp_path, tmp_path / "out")["markdown"].splitlines()
    assert (
        lines[0]
        == "| job | status | message | n | guidance | N | NFE | fid | kid_mean | accuracy | fid_real_floor |"
    )
    assert lines[2:8] == [
        "| 0 | ok | — | 1000 | 1.0 | 1000 | 20 | 3 | 0.003 | 0.95 | 0.5 |",
        "| 0 | ok | — | 1000 | 2.0 | 1000 | 40 | 2 | 0.002 | 1 | 0.5 |",
        "| 1 | ok | — | 5000 | 1.0 | 5000 | 20 | 3* | 0.003* | 0.95* | 0.5* |",
        "| 1 | ok | — | 5000 | 2.0 | 5000 | 40 | 2* | 0.002* | 1* | 0.5* |",
        "| 2 | ok | — | 1000 | 1.0 | 1000 | 20 | 4 | 0.004 | 0.95 | 0.5 |",
        "| 2 | ok | — | 1000 | 2.0 | 1000 | 40 | 3 | 0.003 | 1 | 0.5 |",
    ]
    assert lines[-1] == ("* N differs from the most common N (1000): FID is biased upwards at small N, so "
                         "compare such a score with its own fid_real_floor, not down the column")  # fmt: skip
    assert read_csv(tmp_path / "out" / "report.csv")[2]["fid"] == "3"  # the CSV keeps plain numbers


def test_eval_sweep_with_different_references_or_no_provenance_is_refused(tmp_path):
    make_eval_job(tmp_path / "a", 0, ["seed=0"], eval_results())
    other = eval_results()
    other["provenance"]["reference"] = {**REFERENCE, "size": 5000}
    make_eval_job(tmp_path / "a", 1, ["seed=1"], other)
    with pytest.raises(
        ConfigError, match=re.escape("jobs 0 and 1: reference size 10000 vs 5000: scores from")
    ):
        report.write_report(tmp_path / "a", tmp_path / "out")
    make_eval_job(tmp_path / "b", 0, ["seed=0"], eval_results())
    make_eval_job(
        tmp_path / "b", 1, ["seed=1"], {k: v for k, v in eval_results().items() if k != "provenance"}
    )
    with pytest.raises(ConfigError, match="jobs 0 and 1: extractor name MNISTClassifier vs none recorded"):
        report.write_report(tmp_path / "b", tmp_path / "out")


def test_mixed_extractors_are_one_error_line_from_dlab_report(tmp_path):
    sweep = tmp_path / "sweep"
    make_eval_job(sweep, 0, ["ckpt_path=a"], eval_results())
    make_eval_job(sweep, 1, ["ckpt_path=b"], eval_results(extractor={**EXTRACTOR, "sha256": "9f3c" * 16}))
    result = run_cli("dlab-report", f"sweep={sweep}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(
        result, 2, f"sweep={sweep}: jobs 0 and 1: extractor sha256 ab12cd34… vs 9f3c9f3c…: scores from different",
        "re-run dlab-eval on these checkpoints with the same evaluator",
    )  # fmt: skip
    assert not (tmp_path / "out" / "report.md").exists()


def test_a_truncated_eval_json_is_a_failed_job(tmp_path):
    make_job(tmp_path, 0, ["seed=0"], None)
    (tmp_path / "0" / "eval.json").write_text('{"guidance": {')  # killed while writing
    (job,) = report.load_jobs(tmp_path)
    assert job.status == "failed" and job.message.startswith("eval.json is not valid JSON")
