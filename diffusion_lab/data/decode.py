"""One captioned sample, read the same way from an image folder and from webdataset shards: image
bytes → uint8 (C, size, size), a caption cell → its strings; and a batch of such items, with the
spatial condition maps (data.conditions) added to it.

A sample that cannot be used raises BadSample; the caller applies data.on_bad_sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion_lab.data import spatial
from diffusion_lab.data.bad_samples import BadSample
from diffusion_lab.utils.images import to_model_range

JSON_TYPES = {int: "a number", float: "a number", bool: "true/false", dict: "an object"}


def load_image(src, size: int, mode: str) -> torch.Tensor:
    """A path or file object → uint8 (C, size, size): shorter side resized, centre-cropped."""
    try:
        with Image.open(src) as img:
            img = ImageOps.fit(img.convert(mode), (size, size), Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample(f"is not a readable image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(np.array(img)).view(size, size, -1).permute(2, 0, 1)


def caption_list(value) -> list[str]:
    """A caption cell as a non-empty list of non-empty strings."""
    items = value if isinstance(value, list) else [value]
    not_text = next((c for c in items if c is not None and not isinstance(c, str)), None)
    if not_text is not None:
        kind = "a list" if isinstance(not_text, list) else JSON_TYPES.get(type(not_text), "not a string")
        raise BadSample(
            f"has a caption that is not text ({json.dumps(not_text)} is {kind}): a caption is a string in "
            "quotes, or a list of them"
        )
    if not items or not all(isinstance(c, str) and c.strip() for c in items):
        raise BadSample(f"has an empty or missing caption ({json.dumps(value)})")
    return [c.strip() for c in items]


def collate(items: list[dict], conditions: Mapping | None = None, seed: int = 0) -> dict:
    """Items `{"image": uint8 (C, H, W), "caption": str}` → a batch; skipped samples ride in `_bad`.

    With `conditions` (source → options), each source's map is added under its name, seeded per
    sample by `seed` and the item's `_id`: its index in the folder, or its key in the shards.
    """
    batch = {"image": to_model_range(torch.stack([i["image"] for i in items])), "caption": []}
    for item in items:
        batch["caption"].append(item["caption"])
        batch.setdefault("_bad", []).extend(item.get("_bad", ()))
    if conditions:
        ids = [item["_id"] for item in items]
        is_key = isinstance(ids[0], str)
        seeds = spatial.key_seeds(seed, ids) if is_key else spatial.sample_seeds(seed, torch.tensor(ids))
        batch |= spatial.derive(batch["image"], conditions, seeds)
    return batch
