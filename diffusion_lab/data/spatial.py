"""Spatial conditions derived from each training image by a seeded transform (issue 20), so every data
set has them without a new one: a sketch, a semantic map, a low-res image and a masked image.

Every map is image-shaped, (B, k, H, W) at the image's size, so `concat` can stack it on the input.
The transforms are batched tensor code (no Python loop over pixels). Only `inpaint` is random, and
each sample draws its mask from its own generator seeded by `sample_seeds(seed, index)`, so a sample
gets the same mask at train and validation time, in any batch and in any loader worker.
`derive` is what the DataModules call with `data.conditions`, e.g. `{"sketch": {}, "lowres":
{"factor": 4}}`; the metrics call the same transforms to judge a sample against its condition.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.errors import ConfigError

SOURCES = ("sketch", "semantic", "lowres", "inpaint")
OPTIONS = {"sketch": (), "semantic": (), "lowres": ("factor",), "inpaint": ("masks",)}
MASKS = ("box", "free_form")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of PIL's "L" conversion


def channels(source: str, image_channels: int) -> int:
    """Channels of `source`'s map for images of `image_channels` channels (the net's extra inputs)."""
    counts = {
        "sketch": 1,
        "semantic": 8 if image_channels == 3 else 3,  # RGB: 2^3 colour regions; grey: bg, stroke, hole
        "lowres": image_channels,
        "inpaint": image_channels + 1,  # the masked image and the keep mask
    }
    if source not in counts:
        raise ConfigError(_unknown_source(source))
    return counts[source]


def _strokes(images: Tensor) -> Tensor:
    """(B, H, W) bool: where the luminance of (B, C, H, W) images in [-1, 1] is above mid-grey."""
    if images.shape[1] == 3:
        luma = torch.einsum("bchw,c->bhw", images.float(), torch.tensor(LUMA, device=images.device))
    else:
        luma = images.float().mean(1)
    return luma > 0


# ---- sketch: Zhang-Suen thinning ------------------------------------------------------------------
def _neighbours(x: Tensor) -> list[Tensor]:
    """Zhang and Suen's P2..P9 of every pixel of x (B, H, W) bool: N, NE, E, SE, S, SW, W, NW
    (clockwise from north), False off the edge."""
    h, w = x.shape[-2:]
    padded = F.pad(x.to(torch.uint8), (1, 1, 1, 1)).bool()
    steps = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    return [padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in steps]


def sketch(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] → (B, 1, H, W) in {0, 1}: the strokes thinned to 1-px lines.

    Zhang and Suen (1984), "A fast parallel algorithm for thinning digital patterns": each pass deletes,
    in two sub-passes, the stroke pixels with 2..6 stroke neighbours and exactly one 0→1 transition
    around them that lie on the south-east boundary (first) or the north-west one (second), until a
    pass deletes nothing. A thinned map is a fixed point, so a sketch of a sketch is the same sketch.
    """
    x = _strokes(images)
    while True:
        before = x
        for first in (True, False):
            n = _neighbours(x)
            count = torch.stack(n).sum(0)
            transitions = sum((~n[i] & n[(i + 1) % 8]).to(torch.uint8) for i in range(8))
            if first:  # P2·P4·P6 = 0 and P4·P6·P8 = 0: the east or south side, or the north-west corner
                edge = ~(n[0] & n[2] & n[4]) & ~(n[2] & n[4] & n[6])
            else:  # P2·P4·P8 = 0 and P2·P6·P8 = 0: the west or north side, or the south-east corner
                edge = ~(n[0] & n[2] & n[6]) & ~(n[0] & n[4] & n[6])
            x = x & ~((count >= 2) & (count <= 6) & (transitions == 1) & edge)
        if torch.equal(x, before):
            return x.unsqueeze(1).float()


# ---- semantic: background, stroke, hole (grey) or colour regions (RGB) -----------------------------
def semantic(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] → (B, R, H, W) one-hot float.

    Grey (R = 3): 0 the background reachable from the border, 1 the strokes, 2 the holes (background
    that strokes enclose, the inside of a 0, 6, 8 or 9). The border's background is flood-filled
    through 4-connected background pixels, so a ring of diagonal (8-connected) steps still closes.
    RGB (R = 8): region 4·(r > 0) + 2·(g > 0) + (b > 0).
    """
    if images.shape[1] == 3:
        r, g, b = (images[:, c] > 0 for c in range(3))
        return F.one_hot(4 * r.long() + 2 * g.long() + b.long(), 8).permute(0, 3, 1, 2).float()
    strokes = _strokes(images)
    background = ~strokes
    outside = torch.zeros_like(background)
    outside[:, [0, -1], :] = True
    outside[:, :, [0, -1]] = True
    outside &= background
    while True:
        grown = outside.clone()
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown[:, :, 1:] |= outside[:, :, :-1]
        grown[:, :, :-1] |= outside[:, :, 1:]
        grown &= background
        if torch.equal(grown, outside):
            break
        outside = grown
    region = torch.where(strokes, 1, torch.where(outside, 0, 2))
    return F.one_hot(region, 3).permute(0, 3, 1, 2).float()


# ---- lowres ---------------------------------------------------------------------------------------
def lowres(images: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) → (B, C, H, W): the means of factor × factor blocks, each repeated over its block
    (downsampled by `factor`, shown at the image's size)."""
    h, w = images.shape[-2:]
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or h % factor or w % factor:
        divisors = [d for d in range(1, math.gcd(h, w) + 1) if math.gcd(h, w) % d == 0]
        raise ConfigError(
            f"data.conditions.lowres.factor={factor!r} cannot work for {h}x{w} images: it must be a whole "
            f"number that divides both sides, one of {divisors}. Set data.conditions.lowres.factor to one."
        )
    return F.interpolate(F.avg_pool2d(images.float(), factor), scale_factor=factor, mode="nearest")


# ---- inpaint --------------------------------------------------------------------------------------
def _box(g: torch.Generator, h: int, w: int) -> Tensor:
    """(H, W) bool, True inside a box whose sides are 1/4..1/2 of the image's, placed at random."""
    sides = []
    for side in (h, w):
        low = max(1, math.ceil(side / 4))
        sides.append(int(torch.randint(low, max(low, side // 2) + 1, (), generator=g)))
    top = int(torch.randint(h - sides[0] + 1, (), generator=g))
    left = int(torch.randint(w - sides[1] + 1, (), generator=g))
    hole = torch.zeros(h, w, dtype=torch.bool)
    hole[top : top + sides[0], left : left + sides[1]] = True
    return hole


def _free_form(g: torch.Generator, h: int, w: int) -> Tensor:
    """(H, W) bool, True under a brush stroke: 2..4 straight segments of a random walk from a point of
    the central half (each 1/8..1/3 of the side long, turning at random, stopped at the image's edge)
    painted with a brush 2..4 px wide."""
    side = min(h, w)
    segments = int(torch.randint(2, 5, (), generator=g))
    angles = torch.rand(segments, generator=g, dtype=torch.float64) * 2 * math.pi
    lengths = side * (1 / 8 + torch.rand(segments, generator=g, dtype=torch.float64) * (1 / 3 - 1 / 8))
    start = (0.25 + torch.rand(2, generator=g, dtype=torch.float64) / 2) * torch.tensor([h - 1, w - 1])
    steps = torch.stack([angles.sin(), angles.cos()], 1) * lengths[:, None]  # (S, 2) as (dy, dx)
    limit = torch.tensor([h - 1.0, w - 1.0], dtype=torch.float64)
    points = torch.cat([start[None], start + steps.cumsum(0)]).clamp(
        torch.zeros(2, dtype=torch.float64), limit
    )  # (S+1, 2)
    width = 2 + 2 * float(torch.rand((), generator=g, dtype=torch.float64))
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pixels = torch.stack([ys, xs], -1).reshape(-1, 1, 2).double()  # (H*W, 1, 2)
    a, b = points[:-1], points[1:]  # each segment's ends, (S, 2)
    along = ((pixels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp_min(1e-12)
    nearest = a + along.clamp(0, 1)[..., None] * (b - a)  # (H*W, S, 2): closest point of each segment
    distance = (pixels - nearest).norm(dim=-1).amin(1)
    return (distance <= width / 2).reshape(h, w)


def _mask_kinds(masks: Sequence[str] | str) -> tuple[str, ...]:
    kinds = (masks,) if isinstance(masks, str) else tuple(masks)
    if not kinds or any(kind not in MASKS for kind in kinds):
        raise ConfigError(
            f"data.conditions.inpaint.masks={list(kinds)!r} cannot work: expected a non-empty list of "
            f"mask kinds from {list(MASKS)}, e.g. data.conditions.inpaint.masks=[box,free_form]."
        )
    return kinds


def inpaint(images: Tensor, seeds: Tensor, masks: Sequence[str] = MASKS) -> Tensor:
    """(B, C, H, W) → (B, C + 1, H, W): the image with a masked region set to 0, then the keep mask
    (1 = kept pixel, 0 = to be filled). Sample i's mask kind (among `masks`) and shape come from a
    generator seeded by seeds[i] alone: same seed, same mask; the global RNG is not touched."""
    kinds, (b, _, h, w) = _mask_kinds(masks), images.shape
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if seeds.shape != (b,):
        raise ValueError(f"inpaint needs one seed per image: {b} images, seeds of shape {tuple(seeds.shape)}")
    holes = []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(seed)
        kind = kinds[int(torch.randint(len(kinds), (), generator=g))]
        holes.append(_box(g, h, w) if kind == "box" else _free_form(g, h, w))
    keep = (~torch.stack(holes)).unsqueeze(1).to(images.device, torch.float32)  # (B, 1, H, W)
    return torch.cat([images.float() * keep, keep], 1)


# ---- seeds and the DataModules' entry point ------------------------------------------------------
def _hash(seed: int, token: str) -> int:
    """A well-mixed non-negative int64 from (seed, token), the same in every process and Python run."""
    digest = hashlib.blake2b(f"{seed}:{token}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seeds(seed: int, indices: Tensor) -> Tensor:
    """(B,) int64: the mask seed of each sample index, from the run's `data.condition_seed`."""
    return torch.tensor([_hash(seed, str(i)) for i in torch.as_tensor(indices).tolist()], dtype=torch.int64)


def key_seeds(seed: int, keys: Sequence[str]) -> Tensor:
    """(B,) int64: the mask seed of each webdataset sample, from its key (streams have no index)."""
    return torch.tensor([_hash(seed, f"key:{key}") for key in keys], dtype=torch.int64)


def check(conditions: Mapping | None) -> dict[str, dict]:
    """`data.conditions` as plain dicts, checked: known sources, known options, the required ones set."""
    checked = {}
    for name, options in (conditions or {}).items():
        if name not in SOURCES:
            raise ConfigError(_unknown_source(name))
        known = OPTIONS[name]
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(
                f"data.conditions.{name}={options!r} cannot work: expected a mapping of its options "
                f"({', '.join(known) or 'it has none'}), e.g. data.conditions.{name}={{}}."
            )
        options = dict(options or {})
        unknown = sorted(str(key) for key in options if key not in known)
        if unknown:
            raise ConfigError(
                f"data.conditions.{name}.{unknown[0]}: {name} takes no option {unknown[0]!r}; its options "
                f"are {list(known)}. Fix or drop it."
            )
        if name == "lowres" and "factor" not in options:
            raise ConfigError(
                "data.conditions.lowres needs factor, the downsampling factor (4: 7→28, 2: 14→28 on MNIST). "
                "Set data.conditions.lowres.factor."
            )
        if "masks" in options:
            options["masks"] = _mask_kinds(options["masks"])
        checked[str(name)] = options
    return checked


def derive(images: Tensor, conditions: Mapping[str, Mapping], seeds: Tensor) -> dict[str, Tensor]:
    """The map of every source in `conditions` (source → options) for (B, C, H, W) images in [-1, 1];
    `seeds` (B,) are the samples' seeds (`sample_seeds`), which only `inpaint` reads."""
    maps = {}
    for name, options in check(conditions).items():
        transform = {"sketch": sketch, "semantic": semantic, "lowres": lowres}.get(name)
        maps[name] = transform(images, **options) if transform else inpaint(images, seeds, **options)
    return maps


def _unknown_source(name) -> str:
    return (
        f"data.conditions.{name}: no such condition source; the known ones are {list(SOURCES)}. "
        "Fix the name or drop it."
    )
