"""`dlab-report` on a `dlab-eval -m` sweep: a row per job, EMA length and guidance key, provenance checked
(synthetic job folders as dlab-eval leaves them; one run of the installed command, for its error line)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffusion_lab import report
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.metrics import provenance as prov
from diffusion_lab.utils.sweeps import write_status
from tests.commands.test_report import make_job, read_csv
from tests.conftest import assert_one_line_error, run_cli

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
