"""The console entry points as a user runs them: a subprocess of the real CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli


def test_wrong_group_option_fails_before_loading_data(tmp_path):
    result = run_cli("dlab-train", "conditioning=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'conditioning/nope'" in result.stderr
    assert "Available options" in result.stderr and "cross_attn" in result.stderr
    assert "instantiating datamodule" not in result.stdout + result.stderr


def test_misspelt_key_fails_before_loading_data(tmp_path):
    result = run_cli("dlab-train", "trainer.max_epoch=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "max_epoch" in result.stderr and "not in struct" in result.stderr
    assert "instantiating datamodule" not in result.stdout + result.stderr


def test_resume_from_missing_checkpoint_exits_nonzero(tmp_path):
    result = run_cli("dlab-train", "debug=tiny", "ckpt_path=runs/gone/last.ckpt", cwd=tmp_path)
    assert result.returncode != 0
    assert "runs/gone/last.ckpt" in result.stderr and "no checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert "instantiating datamodule" not in result.stdout + result.stderr


def test_run_folder_layout(tiny_run):
    _, run_dir, result = tiny_run
    for path in ["checkpoints/last.ckpt", ".hydra/config.yaml", "metrics.json", ".hydra/config_tree.log"]:
        assert (run_dir / path).is_file(), path
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))  # one grid per validation
    assert "model_checkpoint" in result.stdout  # the printed config tree


def test_csv_logger_holds_training_loss(tiny_run):
    _, run_dir, _ = tiny_run
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert any(r.get("val/loss") for r in rows)


def test_wandb_offline_run_holds_sample_grids_and_config(tiny_run):
    _, run_dir, _ = tiny_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    images = list((offline / "files" / "media" / "images").glob("samples_*.png"))
    assert len(images) == 2  # one per epoch
    # The offline record file (protobuf records holding JSON values): the resolved config and the loss.
    records = next(offline.glob("run-*.wandb")).read_bytes()
    assert b'"conditioning":{"_target_":"diffusion_lab.nets.conditioning.ConcatConditioning"' in records
    assert b"train/loss" in records


def test_tensorboard_logger_writes_events(tiny_run):
    _, run_dir, _ = tiny_run
    assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


def test_dlab_sample_writes_the_npz_contract(tiny_run, tmp_path):
    cwd, run_dir, _ = tiny_run
    out = tmp_path / "samples"
    result = run_cli(
        "dlab-sample", f"ckpt_path={run_dir}", "n=12", "guidance=[0.0,2.0]", "sampler=dpmpp",
        "steps=3", f"out={out}", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "samples.npz") as data:
        assert data["images"].dtype == np.uint8 and data["images"].shape == (24, 1, 28, 28)
        assert data["labels"].tolist() == (list(range(10)) + [0, 1]) * 2
        assert data["guidance"].tolist() == [0.0] * 12 + [2.0] * 12
        assert data["guidance_interval"].tolist() == [0.0, math.inf]  # no interval: every step guided
    # The preview: a row per class, one column per guidance scale (digits 2-9 were drawn once each)
    assert (
        f"wrote {out / 'samples.npz'} (24 images) and {out / 'samples.png'} (a preview of 20:"
        in result.stdout
    )
    with Image.open(out / "samples.png") as png:
        assert png.size == (2 * 30 + 2, 10 * 30 + 2)


@pytest.mark.slow
def test_dlab_sample_defaults_to_the_guidance_the_run_names_and_records_autoguidance(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["run_config"]["guidance"] == 1.6  # the recipe's (experiment=mnist_cpu), stored
    checkpoint["run_config"]["guidance"] = 1.35  # as experiment=mnist_best would store it
    torch.save(checkpoint, tmp_path / "best.ckpt")
    weak = run_dir / "checkpoints" / "last.ckpt"  # autoguidance against another checkpoint of the task
    args = [f"ckpt_path={tmp_path / 'best.ckpt'}", "n=4", "steps=1", "out=samples", f"guidance_model={weak}"]
    result = run_cli("dlab-sample", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sampling from {tmp_path / 'best.ckpt'} at guidance 1.35 (the run's own)" in result.stdout
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        assert data["guidance"].tolist() == [np.float32(1.35)] * 4
        assert data["guidance_kind"] == "autoguidance" and data["guidance_model"] == str(weak)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        ("dlab-sample", ["prompts=[]"], "error: prompts=[]: the list is empty; give at least one caption"),
        pytest.param(
            "dlab-sample", ["device=cuda"], "error: device=cuda: this machine has no GPU that torch can use",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        # FID's bound is checked before the (here missing) evaluator is asked for
        ("dlab-eval", ["n=100"], "error: n=100: FID needs at least 256 images"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named_before_the_checkpoint_or_evaluator_loads(tmp_path, command, args, line):
    result = run_cli(command, *args, cwd=tmp_path, env={"DLAB_CACHE_DIR": str(tmp_path / "no_cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    (only,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert only.startswith(line), only
