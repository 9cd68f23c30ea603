"""What `dlab-eval` asks a model for, and what each sample should then show.

A class model is asked for balanced labels. A caption model is asked for held-out captions of captioned
MNIST (the `val` metadata written by `dlab-make-captions`), each with the digit and the attribute classes
it describes, so samples can be scored for digit accuracy and for caption fidelity (`attributes.agreement`).
A model with spatial conditions (a sketch, a semantic map, a low-res or masked image) is given the maps of
held-out real digits, derived by the transforms training used (`data.spatial`): the official MNIST test
split, or, with a caption as well, the captioned val images themselves, so caption and map describe one
digit. Its samples should show that digit (accuracy) and obey the maps (`spatial_fidelity`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion_lab.condition import cycle
from diffusion_lab.data import spatial
from diffusion_lab.data.condition_files import read_images
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import DataError
from diffusion_lab.metrics.attributes import ATTRIBUTES
from diffusion_lab.metrics.spatial_fidelity import fidelity, real_floor
from diffusion_lab.utils.images import to_model_range


@dataclass
class Targets:
    # What the model is given: labels, captions, maps, or {input key: those} for several conditions.
    inputs: torch.Tensor | list[str] | dict
    digits: torch.Tensor  # (N,) the digit each sample should show
    attributes: dict[str, list[str]] | None = None  # caption models: the class each sample should show
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # spatial source -> (N, C, H, W) given
    transforms: dict[str, dict] = field(default_factory=dict)  # spatial source -> its transform options
    real: torch.Tensor | None = None  # (N, C, H, W) the real digits the maps came from (the floor)
    seeds: torch.Tensor | None = None  # (N,) their seeds (`spatial.sample_seeds`), as `maps` used

    def fidelity(self, samples: torch.Tensor) -> dict[str, float]:
        """The mean score of `samples` against the maps they were given, per spatial source."""
        return {
            name: values.mean().item()
            for source, given in self.maps.items()
            for name, values in fidelity(source, given, samples, self.transforms[source]).items()
        }

    def fidelity_floor(self) -> dict[str, float]:
        """Each spatial score of the real digits against their own maps: what a perfect model gets."""
        return {
            name: value
            for source, options in self.transforms.items()
            for name, value in real_floor(source, self.real, options, self.seeds).items()
        }


def held_out_captions(path: str | Path) -> list[dict]:
    """The rows of a captioned-MNIST `metadata.jsonl` (or of the one in folder `path`), checked to carry
    `text`, `label` and every attribute column."""
    path = _metadata(path)
    if not path.is_file():
        raise DataError(
            f"captions={path}: no such metadata.jsonl. Caption fidelity needs held-out captioned MNIST: "
            "run `dlab-make-captions out=<folder>` and pass captions=<folder>/val"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    needed = {"text", "label", *ATTRIBUTES}
    if not rows or not needed <= rows[0].keys():
        raise DataError(
            f"{path}: caption fidelity needs the columns {sorted(needed)}, found "
            f"{sorted(rows[0]) if rows else 'no rows'}; use the val folder written by dlab-make-captions"
        )
    return rows


def _metadata(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "metadata.jsonl" if path.is_dir() else path


def _sources(encoder) -> list:
    """The encoder of each condition: a combined encoder's sources, or the encoder itself."""
    return list(encoder.sources.values()) if hasattr(encoder, "sources") else [encoder]


def _caption_rows(module, n: int, captions, with_images: bool):
    """(texts, digits, attributes, images or None) of the first `n` held-out caption rows (cycled);
    images (read from the files the rows name, at the net's size) only `with_images`, one per distinct row."""
    captions = captions or (module.run_config or {}).get("data", {}).get("val_root")
    if not captions:
        raise DataError("this caption model was trained without data.val_root: pass captions=<val folder>")
    distinct = held_out_captions(captions)[:n]
    rows = cycle(distinct, n)
    texts = [r["text"][0] if isinstance(r["text"], list) else r["text"] for r in rows]
    attributes = {name: [r[name] for r in rows] for name in ATTRIBUTES}
    images = None
    if with_images:
        if "file_name" not in distinct[0]:
            raise DataError(
                f"{_metadata(captions)}: no file_name column; use a dlab-make-captions val folder"
            )
        folder, size, channels = _metadata(captions).parent, module.net.image_size, module.net.in_channels
        images = torch.cat(
            [read_images(folder / r["file_name"], "captions", size, channels) for r in distinct]
        )
    return texts, torch.tensor([r["label"] for r in rows]), attributes, images


def targets_for(module, n: int, captions=None, data_dir=None, seed: int = 0) -> Targets:
    """`n` targets: balanced labels; the first `n` held-out captions (cycled); for spatial conditions the
    first `n` digits of the official MNIST test split under `data_dir` (cycled), or of the caption rows'
    images when the model also reads a caption, each map derived with `sample_seeds(seed, index)`.
    `captions` defaults to the validation folder the model was trained with (`data.val_root`)."""
    encoders = {e.input_key: e for e in _sources(module.encoder)}
    transforms = {key: e.transform for key, e in encoders.items() if key in spatial.SOURCES}
    values, attributes, images = {}, None, None
    if "caption" in encoders:
        values["caption"], digits, attributes, images = _caption_rows(module, n, captions, bool(transforms))
    elif transforms:
        images, labels = load_split(data_dir, train=False)
        images, digits = to_model_range(images[:n]), cycle(labels[:n], n)
    else:
        digits = encoders["label"].default_inputs(n)
    values["label"] = digits
    maps, seeds = {}, None
    if transforms:
        seeds = spatial.sample_seeds(seed, torch.arange(len(images)))
        maps = cycle(spatial.derive(images, transforms, seeds), n)
        images, seeds = cycle(images, n), cycle(seeds, n)
    values |= maps
    key = module.encoder.input_key
    inputs = {k: values[k] for k in key} if isinstance(key, tuple) else values[key]
    return Targets(inputs, digits, attributes, maps, transforms, images, seeds)
