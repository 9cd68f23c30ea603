"""Spatial conditions read from files, for `dlab-sample sketch=… semantic=… lowres=… inpaint=… mask=…`
and `conditions_from=<image folder>`: each file becomes exactly the map `data.spatial` derives from a
real image, so the model reads a user's drawing the way it read its training conditions.

Files are read at their own size and never resized: a resized sketch is no longer 1 px thin and a
resized low-res image is not the one the user gave, so a wrong size is an error naming the size the
model expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_lab.data import spatial
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.utils.images import to_model_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MODES = {1: "L", 3: "RGB"}  # image channels → the Pillow mode a file is converted to
# What Pillow raises on bytes it cannot decode (as decode.load_image catches).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
DERIVE = "or derive it from full-size images with conditions_from=<folder>"


def image_files(path: str | Path, key: str) -> list[Path]:
    """`path` itself when it is a file, else the image files in the folder, sorted by name (the order
    that pairs `inpaint=` images with `mask=` masks)."""
    folder = Path(path).expanduser()
    if folder.is_file():
        return [folder]
    files = []
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        problem = "is a folder with no image files" if folder.is_dir() else "does not exist"
        raise DataError(
            f"{key}={str(path)!r} {problem}: give an image file or a folder of them "
            f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})."
        )
    return files


def _pixels(file: Path, key: str, size: int, mode: str | None) -> np.ndarray:
    """One file → its (size, size[, C]) pixels, converted to `mode`, or raw (region ids) for None."""
    try:
        with Image.open(file) as img:
            pixels = np.array(img.convert(mode) if mode else img)
            (width, height), bands = img.size, img.getbands()
    except UNREADABLE as err:
        raise DataError(
            f"{key}={file}: not an image Pillow can read ({type(err).__name__}: {err}); give a PNG or JPEG."
        ) from None
    if (width, height) != (size, size):
        fix = f"resize it, {DERIVE}" if key in spatial.SOURCES else "resize it"
        raise DataError(f"{key}={file} is {width}x{height}; this model's {key} is {size}x{size} ({fix}).")
    if mode is None and len(bands) != 1:
        raise DataError(
            f"{key}={file} has {len(bands)} channels ({''.join(bands)}); {key}= takes an index image "
            "(one channel, each pixel's value its region id), e.g. a greyscale PNG."
        )
    return pixels


def read_images(path: str | Path, key: str, size: int, channels: int) -> torch.Tensor:
    """(N, channels, size, size) float in [-1, 1]: the image file(s) at `path`, in Pillow mode L for
    one channel and RGB for three."""
    files = image_files(path, key)
    pixels = [torch.from_numpy(_pixels(f, key, size, MODES[channels])) for f in files]
    return to_model_range(torch.stack([p.view(size, size, -1).permute(2, 0, 1) for p in pixels]))


# ---------------------------------------------------------------- one reader per source


def _sketch(path, image_size: int) -> torch.Tensor:
    """spatial.sketch takes the pixels brighter than mid-grey as strokes and thins them to its 1-px
    skeleton, so a thick pen drawing works and a 1-px drawing (a fixed point) stays as drawn."""
    return spatial.sketch(read_images(path, "sketch", image_size, 1))


def _semantic(path, image_size: int, regions: int) -> torch.Tensor:
    """An index image (pixel value = region id) → (N, regions, H, W) one-hot."""
    maps = []
    for file in image_files(path, "semantic"):
        ids = torch.from_numpy(_pixels(file, "semantic", image_size, None).astype(np.int64))
        if ids.max() >= regions:
            raise DataError(
                f"semantic={file} has region id {int(ids.max())}; this model's semantic map has {regions} "
                f"regions, so each pixel's value must be a region id 0..{regions - 1}."
            )
        maps.append(F.one_hot(ids, regions).permute(2, 0, 1))
    return torch.stack(maps).float()


def _lowres(path, image_size: int, image_channels: int, factor: int) -> torch.Tensor:
    """Images of image_size // factor → nearest-upsampled to image_size, as spatial.lowres gives."""
    small = read_images(path, "lowres", image_size // factor, image_channels)
    return F.interpolate(small, scale_factor=factor, mode="nearest")


def _inpaint(path, image_size: int, image_channels: int, mask) -> torch.Tensor:
    """Images plus masks (white = fill, as in Stable Diffusion's inpainting) → masked image + keep mask."""
    if mask is None:
        raise DataError(
            "inpaint= needs mask=<png or folder>: one mask per image, white where the model should fill "
            "in and black where it keeps the image."
        )
    images = read_images(path, "inpaint", image_size, image_channels)
    fill = read_images(mask, "mask", image_size, 1) > 0
    if len(fill) != len(images):
        raise DataError(
            f"inpaint={str(path)!r} has {len(images)} images but mask={str(mask)!r} has {len(fill)} masks: "
            "give one mask per image (paired by sorted file name)."
        )
    keep = (~fill).float()
    return torch.cat([images * keep, keep], dim=1)


def read_condition(
    source: str, path, image_size: int, image_channels: int, options: Mapping, mask=None
) -> torch.Tensor:
    """The map the model reads for `source=<path>`, exactly as data.spatial gives it for a real image."""
    if source not in spatial.SOURCES:
        raise ConfigError(
            f"{source}= is not a spatial condition; the spatial conditions are {spatial.SOURCES}."
        )
    if mask is not None and source != "inpaint":
        raise ConfigError(
            f"mask= is the inpainting mask; it goes with inpaint=<png or folder>, not {source}=."
        )
    if source == "sketch":
        return _sketch(path, image_size)
    if source == "semantic":
        return _semantic(path, image_size, spatial.channels("semantic", image_channels))
    if source == "lowres":
        return _lowres(path, image_size, image_channels, options["factor"])
    return _inpaint(path, image_size, image_channels, mask)


def conditions_from(
    folder, sources: Mapping[str, Mapping], image_size: int, image_channels: int, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the real images in `folder`, {source: map}), every map derived by spatial.derive with the
    per-image seeds training would use for images 0..N-1."""
    images = read_images(folder, "conditions_from", image_size, image_channels)
    seeds = spatial.sample_seeds(seed, torch.arange(len(images)))
    return images, spatial.derive(images, dict(sources), seeds)
