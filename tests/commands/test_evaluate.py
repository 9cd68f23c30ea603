"""`dlab-eval` and validation-time FID on a tiny real checkpoint."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffusion_lab.metrics.classifier import EvaluatorMissingError
from diffusion_lab.train import train
from tests.conftest import run_cli

METRIC_KEYS = {"fid", "kid_mean", "kid_std", "accuracy", "per_class_accuracy", "fid_real_floor", "n"}


def test_dlab_eval_writes_every_key_and_both_plots(tiny_run, cache_dir, tmp_path):
    cwd, run_dir, _ = tiny_run
    args = [
        f"ckpt_path={run_dir}", "n=256", "guidance=[0.0,2.0]", "sampler=ddim", "steps=2",
        "steps_sweep.steps=[1,2]", "steps_sweep.n=256", f"out={tmp_path}",
    ]  # fmt: skip
    result = run_cli("dlab-eval", *args, cwd=cwd, env={"DLAB_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text(), parse_constant=pytest.fail)  # no Infinity/NaN
    assert report["guidance_interval"] == [0.0, "inf"]  # no interval: every step guided, in strict JSON
    assert set(report["guidance"]) == {"0.0", "2.0"}
    assert report["sampler"] == {"name": "DDIMSampler", "steps": 2}
    for row in [*report["guidance"].values(), *(r for s in report["steps"].values() for r in s.values())]:
        assert METRIC_KEYS <= set(row) and row["n"] == 256
        assert 0.0 <= row["accuracy"] <= 1.0 and row["fid"] > 0
    assert set(report["steps"]) == {"ddim", "dpmpp"} and set(report["steps"]["ddim"]) == {"1", "2"}
    assert report["fid_real_floor"] > 0 and report["accuracy_real"] >= 0.99
    # A 3-batch model is far from real digits: its FID must sit well above the real-vs-real floor.
    assert report["guidance"]["2.0"]["fid"] > 3 * report["fid_real_floor"]
    for plot in ("guidance.png", "steps.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    with open(next((tmp_path / "csv").glob("version_*/metrics.csv"))) as file:
        assert "eval/fid@g2.0" in next(csv.DictReader(file))


def test_validation_fid_is_logged(compose_cfg, cache_dir):
    cfg = compose_cfg(
        "debug=tiny", "callbacks=with_metrics", f"paths.cache_dir={cache_dir}",
        "callbacks.generative_metrics.n=256", "callbacks.generative_metrics.num_steps=2",
    )  # fmt: skip
    metrics, _ = train(cfg)
    assert metrics["val/fid"] > metrics["val/fid_real_floor"] > 0
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["val/kid_mean"]))


def test_validation_fid_without_evaluator_fails_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=tiny", "callbacks=with_metrics", f"paths.cache_dir={tmp_path}/empty")
    with pytest.raises(EvaluatorMissingError, match="dlab-train-evaluator"):
        train(cfg)
