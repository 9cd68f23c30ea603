"""How well samples obey a spatial condition (a sketch, a semantic map, a low-res or a masked image).

Each score compares the map a sample was given with what the sample shows, per sample:

    scores = fidelity("sketch", given, samples, options)          # {"stroke_f1": (B,)}
    floor = real_floor("sketch", real_images, options, seeds)      # {"stroke_f1": 1.0}

The sample's own map comes from the same transforms that made the training conditions
(`data.spatial`), so a condition and a sample are judged by one ruler, and real images scored
against their own maps give the "real-data floor" dlab-eval prints beside a model's scores.

PSNRs are in dB on [0, 1] pixels (peak 1) and capped at `PSNR_CAP_DB`: an exact match would be
infinite, and one infinite sample would make a batch mean say nothing about the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.data import spatial
from diffusion_lab.utils.images import to_model_range, to_unit

PSNR_CAP_DB = 100.0  # an MSE of 1e-10 on [0, 1] pixels: float32 rounding of equal images stays above it
STROKE_TOLERANCE = 1  # px (Chebyshev): a 1-px skeleton of the same stroke may land on either neighbour
# The score each source of `spatial.SOURCES` is judged by, named as dlab-eval prints it.
SCORES = {"sketch": "stroke_f1", "semantic": "region_iou", "lowres": "lowres_psnr", "inpaint": "kept_psnr"}


# ---- sketch: strokes within a tolerance ----------------------------------------------------------
def _near(strokes: Tensor, tolerance: int) -> Tensor:
    """(B, 1, H, W) {0, 1} -> 1 wherever a stroke pixel lies within `tolerance` px (a square dilation)."""
    return F.max_pool2d(strokes, kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)


def stroke_precision_recall(
    given: Tensor, extracted: Tensor, tolerance: int = STROKE_TOLERANCE
) -> tuple[Tensor, Tensor]:
    """(B,) precision and recall of the extracted strokes against the given ones, each within `tolerance`.

    Precision is the share of extracted stroke pixels with a given stroke pixel within `tolerance` px
    (Chebyshev distance), recall the share of given stroke pixels with an extracted one that near.
    An empty map scores 1.0 on the side where it is the denominator (nothing in it is wrong).
    """
    given, extracted = (given > 0.5).float(), (extracted > 0.5).float()
    n_given, n_extracted = given.sum((1, 2, 3)), extracted.sum((1, 2, 3))
    hits_extracted = (extracted * _near(given, tolerance)).sum((1, 2, 3))
    hits_given = (given * _near(extracted, tolerance)).sum((1, 2, 3))
    precision = torch.where(n_extracted > 0, hits_extracted / n_extracted.clamp_min(1), 1.0)
    recall = torch.where(n_given > 0, hits_given / n_given.clamp_min(1), 1.0)
    return precision, recall


def stroke_f1(given: Tensor, extracted: Tensor, tolerance: int = STROKE_TOLERANCE) -> Tensor:
    """(B,) F1 of two {0, 1} stroke maps (B, 1, H, W); both empty -> 1.0, exactly one empty -> 0.0."""
    precision, recall = stroke_precision_recall(given, extracted, tolerance)
    # One empty map gives precision or recall 1.0 but the other 0.0, so F1 is 0.0 as it should be.
    return torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0
    )


# ---- semantic: per-region IoU --------------------------------------------------------------------
def region_iou(given: Tensor, extracted: Tensor) -> Tensor:
    """(B,) mean IoU over the regions (one-hot channels of (B, R, H, W)) present in either map of a sample.

    A region absent from both maps is left out of that sample's mean, so a digit without holes is not
    credited a free 1.0 for agreeing that it has none.
    """
    given, extracted = given > 0.5, extracted > 0.5
    inter = (given & extracted).sum((2, 3)).float()  # (B, R)
    union = (given | extracted).sum((2, 3)).float()
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), 0.0)
    return iou.sum(1) / present.sum(1).clamp_min(1)


# ---- lowres and inpaint: PSNR on [0, 1] pixels ---------------------------------------------------
def _psnr(squared_error: Tensor, weight: Tensor) -> Tensor:
    """(B,) PSNR (peak 1) of the weighted mean of (B, C, H, W) squared errors, capped at PSNR_CAP_DB."""
    mse = (squared_error * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1)
    return (10 * torch.log10(1 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))).clamp_max(PSNR_CAP_DB)


def lowres_psnr(samples: Tensor, given: Tensor, factor: int) -> Tensor:
    """(B,) PSNR in dB of the samples block-averaged by `factor` against the given low-res map.

    Both are (B, C, H, W) in [-1, 1] and compared on [0, 1]. The sample is averaged by the transform that
    made the condition (`spatial.lowres`, repeated over each block at full size), so every block weighs
    the same as it would at low resolution. Capped at PSNR_CAP_DB (an exact match).
    """
    squared_error = (spatial.lowres(to_unit(samples), factor) - to_unit(given)) ** 2
    return _psnr(squared_error, torch.ones_like(squared_error))


def kept_psnr(samples: Tensor, given: Tensor) -> Tensor:
    """(B,) PSNR in dB over the kept pixels only; `given` is an inpaint map (B, C + 1, H, W), keep mask last.

    Masked pixels (mask 0) do not count, whatever the sample draws there. Compared on [0, 1]; capped
    at PSNR_CAP_DB, which a sample with no kept pixel also gets (nothing it could have changed).
    """
    image, keep = given[:, :-1], given[:, -1:]
    squared_error = (to_unit(samples) - to_unit(image)) ** 2
    return _psnr(squared_error, keep.expand_as(squared_error))


# ---- per source ----------------------------------------------------------------------------------
def fidelity(source: str, given: Tensor, samples: Tensor, options: Mapping) -> dict[str, Tensor]:
    """Per-sample scores (B,) of how well `samples` (B, C, H, W) in [-1, 1] obey the `given` map of `source`.

    Keys are the names dlab-eval prints: `stroke_f1`, `region_iou`, `lowres_psnr` or `kept_psnr`.
    `options` are the source's transform options, as in `data.conditions` (lowres reads `factor`); an
    unknown source or option is the ConfigError `spatial.check` gives training.
    """
    options = spatial.check({source: options})[source]
    samples = to_model_range(samples)
    if source == "sketch":
        score = stroke_f1(given, spatial.sketch(samples))
    elif source == "semantic":
        score = region_iou(given, spatial.semantic(samples))
    elif source == "lowres":
        score = lowres_psnr(samples, given, options["factor"])
    else:
        score = kept_psnr(samples, given)
    return {SCORES[source]: score}


def real_floor(
    source: str, images: Tensor, options: Mapping, seeds: Sequence[int] | Tensor
) -> dict[str, float]:
    """The scores real `images` (uint8 or [-1, 1]) get against their own maps: what a perfect model gets.

    Each image's map is derived with its seed, as in training; the result is the mean over the batch.
    """
    images = to_model_range(images)
    given = spatial.derive(images, {source: options}, seeds)[source]
    return {name: score.mean().item() for name, score in fidelity(source, given, images, options).items()}
