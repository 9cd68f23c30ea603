"""Digit attributes (diffusion_lab/metrics/attributes.py) on constructed images with known answers:
bars of known width, real digits dilated, sheared and squeezed, and the train-split tertiles; then
exact answers from constructions worked out without the measuring code (strokes of known width and
length, bars sheared row by row, solid, hollow and split boxes, anti-aliased edges)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.data.mnist import load_split
from diffusion_lab.metrics.attributes import (
    ATTRIBUTES,
    classify,
    classify_indices,
    measure,
    measure_batched,
    tertiles,
    train_thresholds,
)
from diffusion_lab.utils.images import to_model_range
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_split(DATA_DIR, train=False)[0][:32]  # uint8 (32, 1, 28, 28), all ten classes


def bars(*widths: int) -> torch.Tensor:
    """uint8 vertical bars 20 px high, centred, `width` px wide."""
    images = torch.zeros(len(widths), 1, 28, 28, dtype=torch.uint8)
    for i, w in enumerate(widths):
        images[i, 0, 4:24, 14 - w // 2 : 14 - w // 2 + w] = 255
    return images


def warp(images: torch.Tensor, shear: float = 0.0, x_scale: float = 1.0) -> torch.Tensor:
    """Shear (pixels right per pixel up, > 0 leans the top right) and stretch horizontally about the centre."""
    # Output (x, y) samples the input at (x / x_scale + shear * y); y grows downwards, so the top moves right.
    theta = torch.tensor([[1 / x_scale, shear, 0.0], [0.0, 1.0, 0.0]]).expand(len(images), 2, 3)
    unit = images.float() / 255  # zero padding outside must be background
    grid = F.affine_grid(theta, list(unit.shape), align_corners=False)
    out = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out * 255).round().to(torch.uint8)


def test_thicker_strokes_measure_thicker(digits):
    thickness = measure(bars(1, 2, 4, 6))["thickness"]
    assert torch.all(thickness.diff() > 0), thickness
    assert thickness[0] == pytest.approx(1.0, abs=0.1)  # ≈ the stroke width in pixels
    dilated = F.max_pool2d(digits.float(), 3, stride=1, padding=1).to(torch.uint8)  # every stroke +2 px
    assert torch.all(measure(dilated)["thickness"] > measure(digits)["thickness"])


def test_shear_sets_the_slant(digits):
    assert torch.all(measure(bars(2))["slant"].abs() < 1e-6)  # a vertical bar is upright
    slants = torch.stack([measure(warp(digits, s))["slant"] for s in (-0.5, -0.25, 0.0, 0.25, 0.5)])
    assert torch.all(slants.diff(dim=0) > 0)  # more shear to the right, more slant to the right, per digit

    thresholds = train_thresholds(DATA_DIR)
    upright = digits[torch.tensor([s == "upright" for s in classify(measure(digits), thresholds)["slant"]])]
    assert len(upright) >= 5
    assert set(classify(measure(warp(upright, 0.5)), thresholds)["slant"]) == {"right"}
    assert set(classify(measure(warp(upright, -0.5)), thresholds)["slant"]) == {"left"}
    assert set(classify(measure(warp(bars(2), 0.5)), thresholds)["slant"]) == {"right"}


def test_narrow_digits_measure_narrower(digits):
    width = measure(bars(2, 5, 10))["width"]
    assert torch.all(width.diff() > 0)
    assert width.tolist() == pytest.approx([2.4, 5.4, 10.4], abs=0.01)  # pixels, plus sub-pixel edges
    squeezed, stretched = warp(digits, x_scale=0.7), warp(digits, x_scale=1.2)
    assert torch.all(measure(squeezed)["width"] < measure(digits)["width"])
    assert torch.all(measure(digits)["width"] < measure(stretched)["width"])


def test_uint8_float_and_chunked_measure_the_same(digits):
    as_uint8, as_float = measure(digits), measure(to_model_range(digits))
    in_chunks = measure_batched(digits, batch_size=5)
    for name in ATTRIBUTES:
        torch.testing.assert_close(as_uint8[name], as_float[name])
        torch.testing.assert_close(as_uint8[name], in_chunks[name])


def test_an_empty_image_measures_zero():
    for name, value in measure(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).items():
        assert torch.all(value == 0), name


def test_train_tertiles_split_mnist_into_thirds():
    thresholds = train_thresholds(DATA_DIR)
    values = measure_batched(load_split(DATA_DIR, train=True)[0])
    assert len(values["width"]) == 60_000
    assert thresholds == {name: tertiles(v) for name, v in values.items()}  # the train split's, not another
    for name, index in classify_indices(values, thresholds).items():
        low, high = thresholds[name]
        assert low < high
        shares = torch.bincount(index, minlength=3) / len(index)
        assert torch.all((shares > 0.30) & (shares < 0.37)), (name, shares)


def test_classify_names_the_classes_in_order():
    values = {name: torch.tensor([0.0, 1.5, 3.0]) for name in ATTRIBUTES}
    thresholds = {name: (1.0, 2.0) for name in ATTRIBUTES}
    assert classify(values, thresholds) == {name: list(classes) for name, classes in ATTRIBUTES.items()}
    assert tertiles(torch.arange(300.0)) == pytest.approx((99.67, 199.33), abs=0.01)


# --- known answers from constructions independent of the measuring code ---------------------------


def canvas(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 1, 28, 28, dtype=torch.uint8)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("length", [12, 20])
def test_a_straight_stroke_measures_its_width(width, length):
    """A w x L rectangle holds w*L ink and has 2L + 2w edge pixels (2 per row, 2 per column), so its
    thickness is w*L / (L + w): w, less the share its two ends add. Vertical and horizontal alike."""
    images = canvas(2)
    top, left = (28 - length) // 2, (28 - width) // 2
    images[0, 0, top : top + length, left : left + width] = 255
    images[1, 0] = images[0, 0].T
    expected = width * length / (length + width)
    assert measure(images)["thickness"].tolist() == pytest.approx([expected] * 2, abs=1e-4)


def test_an_anti_aliased_edge_counts_its_share_of_ink():
    """Two full columns and one at half ink (uint8 153 is ink 0.5 above the 0.2 floor): a 2.5 px stroke."""
    images = canvas()
    images[0, 0, 4:24, 12:14] = 255
    images[0, 0, 4:24, 14] = 153
    assert float(measure(images)["thickness"][0]) == pytest.approx(2.5 * 20 / (20 + 2.5), abs=1e-4)


def sheared_bar(shear: float, top: int) -> tuple[torch.Tensor, list[int]]:
    """A 3 px bar over rows top..top+19 whose row y (0 at its top) is moved right by
    round(shear * (10 - y)): the top leans right for shear > 0. Returns the image and the row shifts."""
    image = canvas()
    shifts = [round(shear * (10 - y)) for y in range(20)]
    for y, shift in enumerate(shifts):
        image[0, 0, top + y, 13 + shift : 16 + shift] = 255
    return image, shifts


@pytest.mark.parametrize("top", [1, 4, 7])
@pytest.mark.parametrize("shear", [-1.0, -0.5, -0.2, 0.0, 0.3, 0.5, 1.0])
def test_a_sheared_bar_measures_its_shear(shear, top):
    """Each row holds the same ink, moved by its shift: the slant is the least-squares slope of the
    shifts against height (rows grow down, so against -y), computed here without image moments, and
    wherever the bar sits. A 45-degree shear (1 px per row) is exactly 1."""
    image, shifts = sheared_bar(shear, top)
    slope = np.polyfit(-np.arange(20.0), shifts, 1)[0]
    assert float(measure(image)["slant"][0]) == pytest.approx(slope, abs=1e-5)
    assert slope == pytest.approx(shear, abs=0.06)  # rounding to whole pixels moves the slope a little
    if abs(shear) == 1:
        assert float(measure(image)["slant"][0]) == pytest.approx(shear, abs=1e-5)


@pytest.mark.parametrize("left", [1, 6, 11])
@pytest.mark.parametrize("width", [3, 9, 14])
def test_a_box_measures_its_width_wherever_it_sits(left, width):
    """Solid and hollow boxes, and two bars spanning the same columns, all measure w + 0.4: the edges
    sit where the profile, linear between pixel centres, crosses 0.3 of its peak, 0.7 px beyond the
    outer ink columns' centres."""
    images = canvas(3)
    images[0, 0, 6:20, left : left + width] = 255
    images[1, 0, 6:20, left : left + width] = 255
    images[1, 0, 8:18, left + 1 : left + width - 1] = 0  # hollow
    images[2, 0, 3:9, left] = images[2, 0, 15:25, left + width - 1] = 255  # two strokes, far apart
    assert measure(images)["width"].tolist() == pytest.approx([width + 0.4] * 3, abs=1e-4)


def test_a_half_covered_edge_column_moves_the_edge_by_the_interpolated_crossing():
    """Five full columns then one at ink 0.5: the right edge crosses 0.3 at (0.5 - 0.3) / 0.5 = 0.4 px
    beyond that column's centre, the left one 0.7 px beyond the first column's: 5 + 0.7 + 0.4."""
    image = canvas()
    image[0, 0, 4:24, 10:15] = 255
    image[0, 0, 4:24, 15] = 153
    assert float(measure(image)["width"][0]) == pytest.approx(6.1, abs=1e-4)
