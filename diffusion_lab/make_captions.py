"""`dlab-make-captions`: captioned MNIST in the Hugging Face imagefolder format.

    dlab-make-captions n=10000 n_val=1000 out=data/mnist_captions phrasing=attributes

writes `<out>/train/` (the first `n` of a seeded permutation of the official train split) and
`<out>/val/` (`n_val` from the official test split, so held-out captions for caption fidelity never
come from training digits). Each folder holds grey 28x28 PNGs and `metadata.jsonl`, one line per image:
`file_name`, `text` (the caption), `label`, the class names `thickness`, `slant`, `width`, and the raw
measured values `thickness_value`, `slant_value`, `width_value` (see diffusion_lab/metrics/attributes.py,
whose train-split tertiles define the classes).

Captions vary in wording (several templates, digits as words or numerals, chosen per image with
`seed`) so a text-conditioned model learns the attributes rather than one sentence pattern.
`phrasing=digit` writes captions that name only the digit, the ablation without attributes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track

from diffusion_lab.cli import hydra_app
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.attributes import ATTRIBUTES, classify, measure_batched, train_thresholds
from diffusion_lab.utils import checks

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each attribute class as an adjective and as a phrase. "regular" is a class of both thickness and
# width, so it is always said with its noun ("regular-stroke", "regular width") and never ambiguous.
THICKNESS_ADJ = {"thin": "thin", "regular": "regular-stroke", "thick": "thick"}
SLANT_ADJ = {"left": "left-leaning", "upright": "upright", "right": "right-leaning"}
SLANT_PHRASES = {
    "left": ("slanted to the left", "leaning left"),
    "upright": ("upright", "standing upright"),
    "right": ("slanted to the right", "leaning right"),
}
WIDTH_ADJ = {"narrow": "narrow", "regular": "regular-width", "wide": "wide"}
WIDTH_PHRASES = {"narrow": "drawn narrow", "regular": "of regular width", "wide": "drawn wide"}

# {digit}: word or numeral; {thick}/{slant}/{wide}: adjectives; {strokes}: "thin strokes";
# {leaning}, {width}: phrases ("leaning left", "drawn wide"). Every template names all three attributes.
ATTRIBUTE_TEMPLATES = (
    "a {thick} {digit} {leaning}, {wide}",
    "digit {num}, {strokes}, {slant}, {wide}",
    "a {wide}, {slant} {digit} with {strokes}",
    "{word}: {thick}, {wide}, {leaning}",
    "a handwritten {digit} {width}, {leaning}, with {strokes}",
    "a {slant} {thick} {digit} {width}",
)
DIGIT_TEMPLATES = ("a {word}", "digit {num}", "the number {word}", "a handwritten {digit}", "{num}")
PHRASINGS = {"attributes": ATTRIBUTE_TEMPLATES, "digit": DIGIT_TEMPLATES}


def caption(label: int, attributes: dict[str, str], rng: random.Random, phrasing: str = "attributes") -> str:
    """One caption for a digit `label` with class names `attributes`, wording picked with `rng`."""
    template = rng.choice(PHRASINGS[phrasing])
    thickness, slant, width = (attributes.get(name) for name in ATTRIBUTES)
    fields = {"word": WORDS[label], "num": str(label), "digit": rng.choice((WORDS[label], str(label)))}
    if phrasing == "attributes":
        fields |= {
            "thick": THICKNESS_ADJ[thickness],
            "strokes": f"{thickness} strokes",
            "slant": SLANT_ADJ[slant],
            "leaning": rng.choice(SLANT_PHRASES[slant]),
            "wide": WIDTH_ADJ[width],
            "width": WIDTH_PHRASES[width],
        }
    text = template.format(**fields)
    return re.sub(r"\ba (?=[aeiou8])", "an ", text)  # "an eight", "an upright 7", "an 8"


def write_split(
    folder: Path, images: torch.Tensor, labels: torch.Tensor, thresholds: dict, phrasing: str, seed: int
) -> list[dict]:
    """Write PNGs and metadata.jsonl of one split into `folder`; return the metadata rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{folder.name}-{seed}")  # one stream per split: val wording does not depend on n
    values = measure_batched(images)
    classes = classify(values, thresholds)
    rows = []
    for i in track(range(len(labels)), description=f"writing {folder.name}/", transient=True):
        label = int(labels[i])
        attributes = {name: classes[name][i] for name in ATTRIBUTES}
        file_name = f"{i:05d}.png"
        Image.fromarray(images[i, 0].numpy()).save(folder / file_name)
        rows.append(
            {"file_name": file_name, "text": caption(label, attributes, rng, phrasing), "label": label}
            | attributes
            | {f"{name}_value": round(float(values[name][i]), 4) for name in ATTRIBUTES}
        )
    with (folder / "metadata.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def _first_of_permutation(images, labels, count: int, seed: int, key: str, split: str):
    if count > len(labels):
        raise ConfigError(
            f"{key}={count}: the MNIST {split} split has only {len(labels)} images; use {key}<={len(labels)}"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    return images[order], labels[order]


def run(cfg: DictConfig) -> Path:
    # Every argument is checked before any file is written (split sizes as soon as the data is read).
    n = checks.positive_int(cfg, "n", 10000)
    n_val = checks.positive_int(cfg, "n_val", 1000)
    seed = cfg.get("seed")
    if not checks.is_int(seed):
        raise ConfigError(f"seed={seed!r}: expected a whole number, e.g. seed=0")
    phrasing = cfg.get("phrasing")
    if not isinstance(phrasing, str) or phrasing not in PHRASINGS:
        raise ConfigError(f"phrasing={phrasing!r} is not known; expected one of {', '.join(PHRASINGS)}")
    out = checks.writable_dir(cfg.paths.output_dir)

    data_dir = cfg.paths.data_dir
    train = _first_of_permutation(*load_split(data_dir, train=True), n, seed, "n", "train")
    val = _first_of_permutation(*load_split(data_dir, train=False), n_val, seed, "n_val", "test")
    thresholds = train_thresholds(data_dir)
    rows = write_split(out / "train", *train, thresholds, phrasing, seed)
    write_split(out / "val", *val, thresholds, phrasing, seed)

    examples = "\n".join(f"  {row['file_name']}: {row['text']}" for row in rows[:5])
    print(f"wrote {n} captioned images to {out / 'train'} and {n_val} to {out / 'val'}, e.g.\n{examples}")
    return out


@hydra_app("make_captions")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
