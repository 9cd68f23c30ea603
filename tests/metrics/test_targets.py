"""What `dlab-eval` gives a spatial model (`targets.targets_for`): the maps of held-out real digits, derived
as training derived them, with the digit each map came from; for sketch + caption, both from one image."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.metrics.targets import targets_for
from diffusion_lab.utils.images import to_model_range
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import DATA_DIR

FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1]  # the official MNIST test split starts with these digits


@pytest.fixture(scope="module")
def test_digits():
    images, labels = load_split(DATA_DIR, train=False)
    return images[:8], labels[:8]  # uint8 (8, 1, 28, 28)


def test_a_sketch_model_gets_the_sketches_of_the_test_digits(compose_cfg, test_digits):
    module = build_module(compose_cfg("condition=sketch", "model=unet_tiny"))
    targets = targets_for(module, 6, data_dir=DATA_DIR, seed=3)
    images = to_model_range(test_digits[0][:6])
    assert targets.digits.tolist() == FIRST_TEST_LABELS  # "shows the digit the sketch came from"
    assert torch.equal(targets.maps["sketch"], spatial.sketch(images))
    assert targets.inputs is targets.maps["sketch"]  # a one-condition model reads the map itself
    assert (
        targets.maps["sketch"].sum() > 0 and (targets.maps["sketch"] <= (images > 0)).all()
    )  # on the strokes
    assert torch.equal(targets.real, images)
    # Real digits against their own sketches: a perfect F1, the floor a model is compared with.
    assert targets.fidelity_floor() == {"stroke_f1": 1.0} == targets.fidelity(test_digits[0][:6])
    assert targets.fidelity(test_digits[0][:6].roll(1, 0))["stroke_f1"] < 0.6  # another digit's sketch


def test_inpaint_masks_are_seeded_per_test_digit(compose_cfg, test_digits):
    module = build_module(compose_cfg("condition=inpaint", "model=unet_tiny"))
    targets = targets_for(module, 4, data_dir=DATA_DIR, seed=3)
    images = to_model_range(test_digits[0][:4])
    seeds = spatial.sample_seeds(3, torch.arange(4))
    assert torch.equal(targets.seeds, seeds)
    assert torch.equal(
        targets.maps["inpaint"], spatial.inpaint(images, seeds, module.encoder.transform["masks"])
    )
    keep = targets.maps["inpaint"][:, -1:]
    assert torch.equal(targets.maps["inpaint"][:, :-1], images * keep) and 0 < keep.mean() < 1
    other = targets_for(module, 4, data_dir=DATA_DIR, seed=4).maps["inpaint"][:, -1:]
    assert not torch.equal(other, keep)  # another seed, other masks
    assert targets.fidelity_floor() == {"kept_psnr": 100.0}  # kept pixels unchanged: the PSNR cap


@pytest.fixture
def val_folder(tmp_path, test_digits):
    """A captioned val folder of three real test digits, the rows naming their files out of name order."""
    images, labels = test_digits
    rows = []
    for i, name in zip((0, 1, 2), ("c.png", "a.png", "b.png"), strict=True):
        Image.fromarray(images[i, 0].numpy()).save(tmp_path / name)
        attributes = {"thickness": "thin", "slant": "upright", "width": ("narrow", "wide", "regular")[i]}
        rows.append(
            {"file_name": name, "text": f"digit {int(labels[i])}", "label": int(labels[i])} | attributes
        )
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_sketch_and_caption_come_from_the_same_val_image(compose_cfg, val_folder, test_digits):
    module = build_module(compose_cfg("condition=sketch_text", "conditioning=sketch_text", "model=unet_tiny"))
    targets = targets_for(module, 5, captions=val_folder, seed=0)  # 3 rows, cycled: 0 1 2 0 1
    order = [0, 1, 2, 0, 1]
    images = to_model_range(test_digits[0][order])
    assert set(targets.inputs) == {"sketch", "caption"}
    assert targets.inputs["caption"] == [f"digit {FIRST_TEST_LABELS[i]}" for i in order]
    assert targets.digits.tolist() == [FIRST_TEST_LABELS[i] for i in order]
    assert targets.attributes["width"] == ["narrow", "wide", "regular", "narrow", "wide"]
    assert torch.equal(targets.inputs["sketch"], spatial.sketch(images))  # row i's sketch is its own file's
    assert torch.equal(targets.real, images)
    assert targets.fidelity_floor() == {"stroke_f1": 1.0}
