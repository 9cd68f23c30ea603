"""Digit attributes measured from pixels: stroke thickness, slant and width.

This is the one place these attributes are defined: `dlab-make-captions` writes them into captions,
and a caption-fidelity metric measures generated samples with the same code, so a caption and a
sample are always judged by one ruler.

    values = measure(images)                   # uint8 or [-1, 1] float (N, 1, 28, 28) -> raw float values
    names = classify(values, train_thresholds(data_dir))   # {"thickness": ["thin", ...], ...}

Each attribute has three classes split at the tertiles of the MNIST train split, so every class is
common (about a third of the digits each). Height is not an attribute: MNIST digits are all
normalised to about 20 px high, so it carries no information.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from diffusion_lab.data.mnist import load_split
from diffusion_lab.utils.images import to_model_range, to_unit

# Class names in increasing order of the raw value (index 0 below the low tertile, 2 above the high).
ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "thickness": ("thin", "regular", "thick"),
    "slant": ("left", "upright", "right"),
    "width": ("narrow", "regular", "wide"),
}
INK_FLOOR = 0.2  # intensities below this (in [0, 1]) are background, e.g. faint noise in samples
WIDTH_LEVEL = 0.3  # a column is ink when its brightest pixel reaches this fraction of the image's max
_EPS = 1e-6


def _ink(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 or [-1, 1] float -> (N, H, W) float ink in [0, 1], faint background removed."""
    unit = to_unit(to_model_range(images))[:, 0]
    return ((unit - INK_FLOOR) / (1 - INK_FLOOR)).clamp(0, 1)


def _thickness(ink: torch.Tensor) -> torch.Tensor:
    # Ink mass over half the outline length: a stroke of width w and length L >> w has mass w·L and
    # an outline of about 2·L, so this is w in pixels. The outline is the total variation of the ink
    # (sum of |differences| between neighbours): exact edge count for a binary image, and smooth for
    # anti-aliased strokes. A thicker stroke of the same shape adds mass but hardly any outline.
    outline = (ink.diff(dim=-1).abs().sum((-2, -1)) + ink.diff(dim=-2).abs().sum((-2, -1))).clamp_min(_EPS)
    return 2 * ink.sum((-2, -1)) / outline


def _slant(ink: torch.Tensor) -> torch.Tensor:
    # Shear of the ink's second moments: how far x moves per pixel up (mu11 / mu02). Rows grow
    # downwards, so the sign is flipped: positive means the top leans to the right.
    h, w = ink.shape[-2:]
    rows = torch.arange(h, dtype=ink.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=ink.dtype).view(1, 1, w)
    mass = ink.sum((-2, -1)).clamp_min(_EPS)
    y = rows - (ink * rows).sum((-2, -1), keepdim=True) / mass.view(-1, 1, 1)
    x = cols - (ink * cols).sum((-2, -1), keepdim=True) / mass.view(-1, 1, 1)
    mu11 = (ink * x * y).sum((-2, -1))
    mu02 = (ink * y * y).sum((-2, -1)).clamp_min(_EPS)
    return -mu11 / mu02


def _width(ink: torch.Tensor) -> torch.Tensor:
    # Bounding-box width of the columns holding ink, with edges placed between pixel centres by linear
    # interpolation of where the column profile crosses the level. Whole-pixel widths would tie so
    # often that tertiles could not split MNIST into thirds. A hard bar w px wide measures w + 0.4.
    profile = torch.nn.functional.pad(ink.amax(dim=-2), (1, 1))  # (N, W + 2): zero column each side
    level = WIDTH_LEVEL * profile.amax(-1, keepdim=True)
    inside = profile > level
    size = profile.shape[-1]
    # First and last ink columns; the padding keeps them inside [1, size - 2] (clamped for empty images).
    first = inside.float().argmax(-1, keepdim=True).clamp(1, size - 2)
    last = (size - 1 - inside.flip(-1).float().argmax(-1, keepdim=True)).clamp(1, size - 2)

    def crossing(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        # Distance from the inner column's centre towards the outer one where the profile hits the level.
        p_out, p_in = profile.gather(-1, outer), profile.gather(-1, inner)
        return ((p_in - level) / (p_in - p_out).clamp_min(_EPS)).squeeze(-1)

    width = (last - first).squeeze(-1) + crossing(first - 1, first) + crossing(last + 1, last)
    return torch.where(inside.any(-1), width, torch.zeros_like(width))


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw attribute values of uint8 or [-1, 1] float images (N, 1, 28, 28): {name: float (N,)}.

    thickness: stroke width in pixels; slant: x shift per pixel up (> 0 leans right); width: ink
    bounding-box width in pixels. An empty image measures 0 for each.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W), got shape {tuple(images.shape)}")
    ink = _ink(images)
    return {"thickness": _thickness(ink), "slant": _slant(ink), "width": _width(ink)}


def tertiles(values: torch.Tensor) -> tuple[float, float]:
    """(low, high): the 1/3 and 2/3 quantiles of `values`, the class boundaries of an attribute."""
    low, high = torch.quantile(values.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return float(low), float(high)


def classify_indices(
    values: dict[str, torch.Tensor], thresholds: dict[str, tuple[float, float]]
) -> dict[str, torch.Tensor]:
    """{name: long (N,)} class index per attribute: 0 if value <= low, 2 if value > high, else 1."""
    return {
        name: (v > thresholds[name][0]).long() + (v > thresholds[name][1]).long()
        for name, v in values.items()
    }


def classify(
    values: dict[str, torch.Tensor], thresholds: dict[str, tuple[float, float]]
) -> dict[str, list[str]]:
    """{name: [class name per image]}, e.g. {"slant": ["left", "upright", ...], ...}."""
    return {
        name: [ATTRIBUTES[name][i] for i in index.tolist()]
        for name, index in classify_indices(values, thresholds).items()
    }


def measure_batched(images: torch.Tensor, batch_size: int = 10_000) -> dict[str, torch.Tensor]:
    """`measure` in chunks, so 60k images never hold several full-size float copies at once."""
    parts = [measure(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: torch.cat([p[name] for p in parts]) for name in ATTRIBUTES}


@functools.lru_cache(maxsize=4)
def _train_values(root: str) -> dict[str, torch.Tensor]:
    """Raw values of all 60k MNIST train digits under `root`, measured once per process (a few seconds)."""
    return measure_batched(load_split(root, train=True)[0])


def train_thresholds(data_dir: str | Path) -> dict[str, tuple[float, float]]:
    """{name: (low, high)}: tertiles of the MNIST train split's values, the class boundaries."""
    return {
        name: tertiles(v) for name, v in _train_values(str(Path(data_dir).expanduser().resolve())).items()
    }


def agreement(
    images: torch.Tensor, wanted: dict[str, list[str]], thresholds: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Caption fidelity: per attribute, the fraction of `images` whose measured class is the `wanted` one
    (chance is about 1/3, since the classes split at tertiles)."""
    measured = classify(measure_batched(images), thresholds)
    return {
        name: sum(m == w for m, w in zip(measured[name], wanted[name], strict=True)) / len(wanted[name])
        for name in wanted
    }
