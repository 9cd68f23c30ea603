"""Spatial-condition fidelity (diffusion_lab/metrics/spatial_fidelity.py) against known answers: hand-drawn
stroke maps shifted by whole pixels, 4x4 region maps with IoUs worked out by hand, PSNRs of known offsets in
closed form (10 log10(1 / mse) on [0, 1] pixels), and real MNIST digits scored against their own maps (the
real-data floor) and against another digit's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.data import spatial
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.spatial_fidelity import (
    PSNR_CAP_DB,
    SCORES,
    fidelity,
    kept_psnr,
    lowres_psnr,
    real_floor,
    region_iou,
    stroke_f1,
    stroke_precision_recall,
)
from diffusion_lab.utils.images import to_model_range
from tests.conftest import DATA_DIR


def strokes(*columns: int, size: int = 8) -> torch.Tensor:
    """(1, 1, size, size) {0, 1}: vertical lines in the given columns, rows 1 to size - 2."""
    out = torch.zeros(1, 1, size, size)
    for c in columns:
        out[0, 0, 1 : size - 1, c] = 1
    return out


def regions(*grids: list[list[int]]) -> torch.Tensor:
    """(B, 3, 4, 4) one-hot maps from 4x4 grids of region indices."""
    return F.one_hot(torch.tensor(grids), 3).permute(0, 3, 1, 2).float()


# ---- stroke_f1 -----------------------------------------------------------------------------------
def test_stroke_f1_of_shifted_lines_and_empty_maps():
    line = strokes(3)
    given = torch.cat([line, line, line, strokes(), strokes(), line])
    extracted = torch.cat([line, strokes(4), strokes(5), strokes(), line, strokes()])
    # identical, 1 px off, 2 px off, both empty, nothing given but strokes drawn, strokes given but none drawn
    assert stroke_f1(given, extracted, tolerance=1).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert stroke_f1(given, extracted, tolerance=0).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert stroke_f1(given, extracted, tolerance=2).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_half_the_strokes_missing_is_recall_one_half():
    given, extracted = strokes(1, 6), strokes(1)  # the lines are 5 px apart: no tolerance bridges them
    precision, recall = stroke_precision_recall(given, extracted)
    assert (precision.item(), recall.item()) == (1.0, 0.5)
    assert stroke_f1(given, extracted).item() == pytest.approx(2 / 3)
    # the other way round: half of what was drawn is not in the given sketch
    precision, recall = stroke_precision_recall(extracted, given)
    assert (precision.item(), recall.item()) == (0.5, 1.0)


def test_a_diagonal_neighbour_is_within_one_pixel():
    given, extracted = torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)
    given[0, 0, 2, 2], extracted[0, 0, 3, 3] = 1, 1  # Chebyshev distance 1, Euclidean 1.41
    assert stroke_f1(given, extracted, tolerance=1).item() == 1.0


# ---- region_iou ----------------------------------------------------------------------------------
def test_region_iou_of_hand_made_maps():
    halves = [[0, 0, 1, 1]] * 4
    wide_left = [[0, 0, 0, 1]] * 4
    dotted = [[2, 0, 1, 1]] + [[0, 0, 1, 1]] * 3  # one pixel of region 2 that the other map calls 0
    given = regions(halves, halves, dotted)
    extracted = regions(halves, wide_left, halves)
    # identical; region 0: 8/12 and region 1: 4/8 (region 2 absent from both, left out);
    # region 0: 7/8, region 1: 8/8, region 2: 0/1
    expected = [1.0, (2 / 3 + 1 / 2) / 2, (7 / 8 + 1 + 0) / 3]
    assert region_iou(given, extracted).tolist() == pytest.approx(expected)


# ---- lowres_psnr and kept_psnr -------------------------------------------------------------------
def test_lowres_psnr_of_a_constant_offset_is_the_closed_form():
    torch.manual_seed(0)
    blocks = torch.rand(2, 1, 4, 4) - 0.5  # [-0.5, 0.5]: an offset of 0.2 stays inside [-1, 1]
    given = F.interpolate(blocks, scale_factor=2, mode="nearest")  # (2, 1, 8, 8), factor 2
    # detail that averages away inside each 2x2 block: only the block means are compared
    checker = 0.1 * (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)).remainder(2).mul(2).sub(1)
    samples = given + checker + torch.tensor([0.0, 0.2]).view(2, 1, 1, 1)
    # 0.2 in [-1, 1] is 0.1 on [0, 1]: mse 0.01, 20 dB; no offset is an exact match, the cap
    assert lowres_psnr(samples, given, factor=2).tolist() == pytest.approx([PSNR_CAP_DB, 20.0], abs=1e-3)


def test_kept_psnr_counts_only_the_kept_pixels():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 4, 4) - 0.5
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :, :2] = 1  # the left half is kept
    given = torch.cat([image * keep, keep], dim=1)  # (1, 2, 4, 4): masked pixels 0, mask last
    samples = image.clone()
    samples[..., :, 2:] = torch.rand(1, 1, 4, 2) * 2 - 1  # anything at all in the masked half
    assert kept_psnr(samples, given).item() == pytest.approx(PSNR_CAP_DB)
    shifted = samples + 0.2 * keep  # 0.1 on [0, 1] in every kept pixel: mse 0.01
    assert kept_psnr(shifted, given).item() == pytest.approx(20.0, abs=1e-3)
    half_shifted = samples.clone()
    half_shifted[..., :2, :2] += 0.2  # half of the kept pixels off by 0.1: mse 0.005
    assert kept_psnr(half_shifted, given).item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)


# ---- per source, on real digits ------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Four real test digits (uint8) and, as their "samples", the same four rolled by one: other classes."""
    images, labels = load_split(DATA_DIR, train=False)
    assert len(set(labels[:4].tolist())) == 4  # 7, 2, 1, 0
    return images[:4], images[:4].roll(1, 0)


OPTIONS = {"sketch": {}, "semantic": {}, "lowres": {"factor": 4}, "inpaint": {"masks": ["box", "free_form"]}}


def test_real_digits_score_the_floor_and_another_digit_scores_lower(digits):
    real, others = digits
    seeds = spatial.sample_seeds(0, torch.arange(4))
    floors = {source: real_floor(source, real, options, seeds) for source, options in OPTIONS.items()}
    assert floors == {
        "sketch": {"stroke_f1": 1.0},
        "semantic": {"region_iou": 1.0},
        "lowres": {"lowres_psnr": PSNR_CAP_DB},  # a digit's own 7x7 means, up to float rounding
        "inpaint": {"kept_psnr": PSNR_CAP_DB},
    }
    given = spatial.derive(to_model_range(real), OPTIONS, seeds)
    worse = {
        "stroke_f1": 0.6,
        "region_iou": 0.5,
        "lowres_psnr": 13.0,
        "kept_psnr": 13.0,
    }  # measured 0.57, 0.47, 12.3, 9.6 at most
    for source, options in OPTIONS.items():
        scores = fidelity(source, given[source], others, options)  # uint8 samples, as dlab-sample saves them
        ((name, score),) = scores.items()
        assert score.shape == (4,) and (score < worse[name]).all(), (source, score)


def test_every_source_has_a_score_and_an_unknown_one_is_a_config_error(digits):
    assert set(SCORES) == set(spatial.SOURCES)
    with pytest.raises(ConfigError, match=r"edges.*'sketch', 'semantic', 'lowres', 'inpaint'"):
        fidelity("edges", torch.zeros(1, 1, 28, 28), digits[0][:1], {})
