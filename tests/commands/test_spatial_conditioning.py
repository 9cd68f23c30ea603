"""Spatial and combined conditions through the commands: a sketch + caption model trained by the installed
`dlab-train`, sampled by the installed `dlab-sample` with sketch= files and a scale per condition, and
drawn by `dlab-viz`'s trajectory; the wrong inputs each stop with one clear error before any sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.inference import conditions
from diffusion_lab.sample import read_maps
from diffusion_lab.utils.images import to_model_range
from diffusion_lab.utils.instantiate import build_module
from diffusion_lab.viz import plot_trajectory
from tests.conftest import DATA_DIR, once_per_session, run_cli


@pytest.fixture(scope="session")
def sketch_text_run(captioned_mnist, tmp_path_factory):
    """A tiny sketch + caption model (experiment=mnist_sketch_text), trained once for all xdist workers."""

    def make(cwd: Path) -> None:
        data = [f"data.root={captioned_mnist}/train", f"data.val_root={captioned_mnist}/val"]
        result = run_cli("dlab-train", "experiment=mnist_sketch_text", "debug=tiny", *data, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]

    cwd = once_per_session(tmp_path_factory, "sketch_text_run", make)
    (run_dir,) = (cwd / "outputs" / "debug" / "runs").iterdir()
    return run_dir


def write_sketches(folder: Path, count: int = 2) -> torch.Tensor:
    """The sketches of the first `count` MNIST test digits as PNGs in `folder`; returns the maps."""
    images, _ = load_split(DATA_DIR, train=False)
    maps = spatial.sketch(to_model_range(images[:count]))
    folder.mkdir()
    for i, m in enumerate(maps):
        Image.fromarray((m[0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return maps


def test_dlab_sample_with_a_sketch_and_a_prompt_records_both(sketch_text_run, tmp_path):
    """The validation grid shows the sketches; the npz records the sketch, the prompt, both scales and the form."""
    assert sorted(p.name for p in (sketch_text_run / "samples").iterdir()) == ["step_0000003.png"]
    maps = write_sketches(tmp_path / "sketches")
    args = ["n=4", "steps=2", f"ckpt_path={sketch_text_run}", "sketch=sketches", "prompts=[a thick seven]"]
    guidance = "guidance={sketch: [1, 2], text: 3}"
    result = run_cli("dlab-sample", *args, guidance, "guidance_form=independent", "out=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "out" / "samples.npz") as data:
        assert data["images"].shape == (8, 1, 28, 28)
        assert np.array_equal(data["sketch"], maps.repeat(4, 1, 1, 1).numpy())  # cycled to n, once per scale
        assert data["prompts"].tolist() == ["a thick seven"] * 8
        assert data["guidance_sketch"].tolist() == [1.0] * 4 + [2.0] * 4
        assert data["guidance_text"].tolist() == [3.0] * 8
        assert str(data["guidance_form"]) == "independent"
    assert "one row per condition (shown first)" in result.stdout


@pytest.fixture
def sketch_model(compose_cfg):
    return build_module(compose_cfg("condition=sketch", "model=unet_tiny")).eval()


def sample_cfg(**keys) -> OmegaConf:
    return OmegaConf.create({"mask": None, "conditions_from": None, "seed": 0, **keys})


def test_a_sketch_of_the_wrong_size_names_the_file_and_the_size(sketch_model, tmp_path):
    Image.new("L", (32, 32)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"sketch=.*big\.png is 32x32; this model's sketch is 28x28"):
        read_maps(sample_cfg(sketch=str(tmp_path / "big.png")), sketch_model)


def test_a_file_that_is_not_an_image_names_the_file(sketch_model, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.png: not an image Pillow can read"):
        read_maps(sample_cfg(sketch=str(tmp_path / "notes.png")), sketch_model)


def test_a_sketch_for_a_model_without_one_says_what_it_takes(compose_cfg, tmp_path):
    class_model = build_module(compose_cfg("model=unet_tiny"))
    Image.new("L", (28, 28)).save(tmp_path / "s.png")
    maps, _ = read_maps(sample_cfg(sketch=str(tmp_path / "s.png")), class_model)
    with pytest.raises(
        ConfigError, match=r"sketch= was given, but this model takes no sketch: it takes labels"
    ):
        conditions(class_model.encoder, None, None, checkpoint=Path("m.ckpt"), maps=maps)


def test_a_sketch_model_without_a_sketch_says_how_to_give_one(sketch_model):
    with pytest.raises(ConfigError, match=r"this is a sketch model: give sketch=<png or folder>"):
        conditions(sketch_model.encoder, None, None, checkpoint=Path("m.ckpt"))


def test_conditions_from_derives_the_maps_of_real_images(sketch_model, tmp_path):
    images, _ = load_split(DATA_DIR, train=False)
    (tmp_path / "digits").mkdir()
    for i in range(3):
        Image.fromarray(images[i, 0].numpy()).save(tmp_path / "digits" / f"{i}.png")
    maps, real = read_maps(sample_cfg(conditions_from=str(tmp_path / "digits")), sketch_model)
    assert torch.equal(maps["sketch"], spatial.sketch(to_model_range(images[:3])))
    assert torch.equal(real, to_model_range(images[:3]))


def test_trajectory_shows_each_sketch_above_its_sample(sketch_text_run, compose_cfg, tmp_path):
    """plot_trajectory on a sketch + caption model (the installed dlab-viz trajectory is run in test_viz)."""
    write_sketches(tmp_path / "sketches", count=3)
    keys = [
        f"ckpt_path={sketch_text_run}",
        f"sketch={tmp_path / 'sketches'}",
        "prompts=[a thin one]",
        "steps=2",
    ]
    plot_trajectory(compose_cfg("plot=trajectory", *keys, config_name="viz"))
    with Image.open(tmp_path / "trajectory.gif") as gif:
        assert gif.size == (3 * (3 * 30 + 2), 3 * (3 * 30 + 2))  # 3 columns; rows: sketch, x_t, x̂₀
        first = np.asarray(gif.convert("L"))[3 * 2 : 3 * 30, 3 * 2 : 3 * 30]  # the first sketch, 3x upscaled
    sketch = np.asarray(Image.open(tmp_path / "sketches" / "0.png"))
    assert np.array_equal(first[::3, ::3] > 127, sketch > 127)
