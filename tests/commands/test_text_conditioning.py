"""Text conditioning end to end: captions through every conditioning method, RGB images, prompts in
`dlab-sample`, and caption fidelity in `dlab-eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.inference import resolve_sampler
from diffusion_lab.train import train
from tests.conftest import once_per_session, run_cli


def caption_data(folder) -> list[str]:
    return [f"data.root={folder}/train", f"data.val_root={folder}/val"]


@pytest.mark.parametrize("conditioning", ["concat", "cross_attn", "adaln"])
def test_captions_train_with_every_conditioning_method(compose_cfg, captioned_mnist, conditioning):
    cfg = compose_cfg(
        "experiment=mnist_text_adaln", "debug=tiny", "trainer.fast_dev_run=true",
        f"conditioning={conditioning}", *caption_data(captioned_mnist),
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and objects["module"].encoder.input_key == "caption"
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])


def test_rgb_32px_images_train(compose_cfg, tmp_path):
    """Non-square RGB images are resized and centre-cropped to 32×32 and the net takes 3 channels."""
    rows = []
    for i in range(24):
        colour = (255 * (i % 2), 128, 255 * (i % 3 == 0))
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {'red' if i % 2 else 'green'} square"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_cfg(
        "debug=tiny", "condition=text", "data=captions", f"data.root={tmp_path}", "data.channels=3",
        "data.image_size=32", "data.val_size=8", "callbacks.sample_grid.prompts=[a red square]",
    )  # fmt: skip
    metrics, objects = train(cfg)
    module = objects["module"]
    assert (module.net.in_channels, module.net.image_size) == (3, 32) and objects["trainer"].global_step == 1
    samples = module.generate(["a red square"], sampler=resolve_sampler(module, None, 2))
    assert samples.shape == (1, 3, 32, 32) and torch.isfinite(samples).all()


@pytest.fixture(scope="session")
def text_run(captioned_mnist, tmp_path_factory):
    """A tiny caption model, trained once for all xdist workers."""

    def make(cwd: Path) -> None:
        result = run_cli(
            "dlab-train",
            "experiment=mnist_text_concat",
            "debug=tiny",
            *caption_data(captioned_mnist),
            cwd=cwd,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    cwd = once_per_session(tmp_path_factory, "text_run", make)
    (run_dir,) = (cwd / "outputs" / "debug" / "runs").iterdir()
    assert (run_dir / "samples" / "step_0000003.png").is_file()  # the grid of the experiment's prompts
    return run_dir


def test_dlab_sample_with_prompts_writes_the_npz(text_run, tmp_path):
    long = "digit 1, thin strokes" + " and more words" * 12  # 40 words, past the 32 tokens the model reads
    (tmp_path / "prompts.txt").write_text(f"a thick seven\n\n{long}\n")
    args = ["n=4", "steps=2", "guidance=[1,2]", f"ckpt_path={text_run}"]
    interval = "guidance_interval=[0.5,inf]"
    result = run_cli("dlab-sample", *args, interval, "prompts_file=prompts.txt", "out=samples", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        assert data["images"].shape == (8, 1, 28, 28) and "labels" not in data
        assert data["prompts"].tolist() == ["a thick seven", long] * 4
        seen = "digit 1, thin strokes" + " and more words" * 9  # [CLS] and the first 31 words
        assert data["prompts_seen"].tolist() == ["a thick seven", seen] * 4
        assert data["guidance"].tolist() == [1.0] * 4 + [2.0] * 4
        assert data["guidance_interval"].tolist() == [0.5, math.inf]
    assert result.stdout.count("a caption has 41 tokens, more than the text encoder's limit of 32") == 1
    wrong = run_cli("dlab-sample", *args, "labels=[3]", cwd=tmp_path)
    assert wrong.returncode == 2 and "this is a caption model" in wrong.stderr


def test_dlab_eval_of_a_text_model_reports_caption_fidelity(text_run, captioned_mnist, cache_dir, tmp_path):
    args = [
        f"ckpt_path={text_run}",
        "n=256",
        "guidance=[1]",
        "steps=2",
        "steps_sweep.samplers=[]",
        "out=eval",
    ]
    result = run_cli("dlab-eval", *args, cwd=tmp_path, env={"DLAB_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "eval" / "eval.json").read_text())["guidance"]["1.0"]
    assert set(row["attribute_agreement"]) == {"thickness", "slant", "width"}
    assert all(0.0 <= v <= 1.0 for v in row["attribute_agreement"].values())
    assert row["fid"] > row["fid_real_floor"] > 0 and 0.0 <= row["accuracy"] <= 1.0
    assert (tmp_path / "eval" / "guidance.png").is_file() and not (tmp_path / "eval" / "steps.png").exists()


def test_trajectory_of_a_text_model_takes_prompts(text_run, tmp_path):
    args = [
        "plot=trajectory",
        f"ckpt_path={text_run}",
        "prompts=[a thick seven,digit 1]",
        "steps=2",
        "out=viz",
    ]
    result = run_cli("dlab-viz", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(tmp_path / "viz" / "trajectory.gif") as gif:
        assert gif.size == (3 * (2 * 30 + 2), 3 * (2 * 30 + 2))  # one column per prompt, x_t above x̂₀
