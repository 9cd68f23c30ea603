"""`dlab-eval` and validation-time FID on a tiny real checkpoint; per-condition guidance grids, spatial
fidelity and their heat-maps in-process, on a tiny untrained model built from the real configs."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from diffusion_lab import eval_checks, eval_plots, evaluate
from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import generate_batched, resolve_sampler
from diffusion_lab.metrics.classifier import EvaluatorMissingError
from diffusion_lab.metrics.targets import Targets
from diffusion_lab.nets.encoders import CombinedEncoder, SpatialEncoder
from diffusion_lab.train import train
from diffusion_lab.utils.images import to_model_range
from diffusion_lab.utils.instantiate import build_module
from diffusion_lab.utils.plots import plt
from tests.conftest import DATA_DIR, run_cli

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
    provenance = report["provenance"]  # what every score depends on (metrics/provenance.py)
    assert set(provenance) == {"n", "seed", "batch_size", "extractor", "reference", "sampler", "guidance", "ema",
                               "checkpoint", "code"}  # fmt: skip
    assert provenance["n"] == 256 and len(provenance["extractor"]["sha256"]) == 64
    assert provenance["sampler"]["nfe"] == {"0.0": 2, "2.0": 4}  # s = 0: one pass a step; s = 2: two
    assert provenance["guidance"]["kind"] == "cfg" and provenance["ema"]["kind"] == "ema"
    assert provenance["checkpoint"]["path"] == report["checkpoint"] and provenance["checkpoint"]["step"] > 0
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


class CountingEvaluator:
    """The MNIST evaluator's interface without its 256-image FID bound: `fid` is the call count (1, 2, ...),
    so the row of each grid point, and its heat-map cell, is known."""

    calls = 0

    def evaluate(self, images, labels) -> dict:
        self.calls += 1
        return {"fid": float(self.calls), "kid_mean": 0.0, "accuracy": 0.5, "fid_real_floor": 0.5}


class RecordingLogger:
    def log_metrics(self, metrics: dict) -> None:
        self.metrics = metrics

    def save(self) -> None:
        pass


def sketch_text_targets(n: int = 4) -> Targets:
    """The first `n` test digits' sketches with a caption each, as targets_for gives a sketch + text model."""
    images = to_model_range(load_split(DATA_DIR, train=False)[0][:n])
    seeds = spatial.sample_seeds(0, torch.arange(n))
    maps = spatial.derive(images, {"sketch": {}}, seeds)
    inputs = {"sketch": maps["sketch"], "caption": ["a thin seven"] * n}
    return Targets(inputs, torch.tensor([7, 2, 1, 0][:n]), None, maps, {"sketch": {}}, images, seeds)


def test_a_grid_of_two_scales_gives_a_row_per_point_and_a_heat_map_per_score(
    compose_cfg, tmp_path, monkeypatch
):
    module = build_module(compose_cfg("condition=sketch_text", "conditioning=sketch_text", "model=unet_tiny"))
    grid = "guidance={sketch:[1,2],text:[1,3]}"
    cfg = compose_cfg(grid, "guidance_form=independent", "batch_size=4", config_name="eval")
    asked = []

    def spy(*args, **kwargs):
        asked.append((args[2], kwargs["guidance_form"]))
        return generate_batched(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_batched", spy)
    sampler, targets = resolve_sampler(module.eval(), None, 1), sketch_text_targets(2)
    results = evaluate.guidance_sweep(cfg, CountingEvaluator(), module, sampler, targets)
    points = [(1.0, 1.0), (1.0, 3.0), (2.0, 1.0), (2.0, 3.0)]  # the grid in the order written
    assert asked == [({"sketch": s, "text": t}, "independent") for s, t in points]
    assert list(results["guidance"]) == [
        "sketch=1,text=1",
        "sketch=1,text=3",
        "sketch=2,text=1",
        "sketch=2,text=3",
    ]
    assert [row["fid"] for row in results["guidance"].values()] == [1, 2, 3, 4]
    assert all(0 <= row["stroke_f1"] <= 1 for row in results["guidance"].values())
    assert results["fidelity_real_floor"] == {"stroke_f1": 1.0} and results["guidance_form"] == "independent"
    # One scale on a two-condition model guides both jointly.
    assert 0 <= evaluate.score(CountingEvaluator(), module, sampler, targets, 2.0, cfg)["stroke_f1"] <= 1

    fig = eval_plots.plot_heatmaps(eval_checks.sweep_scales(cfg), list(results["guidance"].values()), {}, 2)
    fid = fig.axes[0]
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["fid", "accuracy", "stroke_f1"]
    assert (fid.get_xlabel(), fid.get_ylabel()) == ("sketch guidance", "text guidance")
    assert fid.images[0].get_array().tolist() == [[1, 3], [2, 4]]  # rows: text 1, 3; columns: sketch 1, 2
    assert [t.get_text() for t in fid.texts] == ["1", "3", "2", "4"]  # each cell's number written in it
    plt.close(fig)
    evaluate.plot_results(cfg, results | {"steps": {}}, tmp_path, [])
    assert (tmp_path / "guidance.png").stat().st_size > 10_000 and not (tmp_path / "steps.png").exists()
    logger = RecordingLogger()
    evaluate.log_results(results, [logger])
    assert (
        logger.metrics["eval/stroke_f1@gsketch=2,text=3"]
        == results["guidance"]["sketch=2,text=3"]["stroke_f1"]
    )
    assert (
        logger.metrics["eval/fid@gsketch=1,text=3"] == 2.0
        and logger.metrics["eval/stroke_f1_real_floor"] == 1.0
    )


@pytest.mark.parametrize(
    ("encoder", "guidance", "message"),
    [
        (SpatialEncoder("sketch", 1), "{sketch: 2}", "guidance gives one scale per condition (sketch), but this "
         "model has one condition (sketch): give numbers"),
        (CombinedEncoder({"sketch": SpatialEncoder("sketch", 1), "lowres": SpatialEncoder("lowres", 1)}),
         "{sketch: 2, text: [1, 3]}", "guidance names text, which this model does not take; its conditions are "
         "sketch, lowres"),
    ],
)  # fmt: skip
def test_per_condition_guidance_names_conditions_the_model_takes(compose_cfg, encoder, guidance, message):
    cfg = compose_cfg(f"guidance={guidance}", config_name="eval")
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as error:
        eval_checks.check_guidance_names(SimpleNamespace(encoder=encoder), cfg)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [("guidance_form=joint", "guidance_form='joint': expected one of nested, independent"),
     ("steps_sweep.guidance=[1,2]", "steps_sweep.guidance=[1, 2]: expected one scale")],
)  # fmt: skip
def test_bad_guidance_form_or_steps_sweep_scale_fail_before_loading(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as error:
        eval_checks.check_arguments(compose_cfg(override, config_name="eval"))
    assert message in str(error.value)


def test_post_hoc_ema_lengths_are_swept_with_guidance_into_rows_and_a_heat_map(
    compose_cfg, tmp_path, monkeypatch
):
    module = build_module(compose_cfg("debug=tiny")).eval()
    cfg = compose_cfg(
        "ema=[0.05,0.15]", "guidance=[1,2]", "batch_size=4", "ckpt_path=run", config_name="eval"
    )
    rebuilt = []

    def post_hoc_module(ckpt_path, sigma_rel, device, runs_dir):
        rebuilt.append((ckpt_path, sigma_rel))
        return module, None

    monkeypatch.setattr(evaluate, "post_hoc_module", post_hoc_module)
    evaluator, sampler = CountingEvaluator(), resolve_sampler(module, None, 1)
    targets = Targets(torch.tensor([3, 7]), torch.tensor([3, 7]))
    results = evaluate.guidance_sweep(cfg, evaluator, module, sampler, targets)
    results["ema"] = evaluate.ema_sweep(cfg, evaluator, sampler, targets, None, "cpu")
    assert rebuilt == [("run", 0.05), ("run", 0.15)]  # each length rebuilt from the run asked for
    assert {k: list(v) for k, v in results["ema"].items()} == {"0.05": ["1.0", "2.0"], "0.15": ["1.0", "2.0"]}
    assert [row["fid"] for rows in results["ema"].values() for row in rows.values()] == [3, 4, 5, 6]

    evaluate.plot_ema(cfg, results, tmp_path, [])
    assert (tmp_path / "ema.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match=r"sigma_rel=0.5: post-hoc EMA reaches 0 < sigma_rel < 0.2887"):
        eval_checks.ema_lengths(compose_cfg("ema=[0.1,0.5]", config_name="eval"))
