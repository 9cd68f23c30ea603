"""`dlab-make-captions` through the installed command: imagefolder layout, captions that say what
the attribute measure says about the written PNG, the digit-only ablation, and argument errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab import make_captions
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.attributes import ATTRIBUTES, classify, measure, train_thresholds
from tests.conftest import DATA_DIR, run_cli

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How each class must appear in a caption: "regular" names two attributes, so it comes with its noun.
MENTIONS = {name: {c: rf"\b{c}\b" for c in classes if c != "regular"} for name, classes in ATTRIBUTES.items()}
MENTIONS["thickness"]["regular"] = r"\bregular[- ]strokes?\b"
MENTIONS["width"]["regular"] = r"\bregular[- ]width\b"
ATTRIBUTE_WORDS = r"\b(thin|thick|regular|strokes?|left|right|upright|leaning|slanted|narrow|wide|width)\b"


def make(tmp_path, *args: str) -> dict[str, list[dict]]:
    """Run the command into tmp_path/caps; return {split: metadata rows}."""
    result = run_cli(
        "dlab-make-captions", "n=50", "n_val=20", f"out={tmp_path / 'caps'}", *args, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(tmp_path / "caps" / "train") in result.stdout  # says where it wrote
    splits = {}
    for split in ("train", "val"):
        splits[split] = [json.loads(line) for line in read_lines(tmp_path / "caps" / split)]
    return splits


def read_lines(folder) -> list[str]:
    return (folder / "metadata.jsonl").read_text().splitlines()


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def skeleton(text: str) -> str:
    """The caption's wording with the digit and attribute words blanked out: one per phrasing."""
    return re.sub(ATTRIBUTE_WORDS, "_", re.sub(rf"\b({'|'.join(WORDS)}|\d)\b", "#", text))


def digits_named(text: str) -> set[int]:
    return {d for d, word in enumerate(WORDS) if re.search(rf"\b({word}|{d})\b", text)}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("captions")
    return tmp_path / "caps", make(tmp_path)


def test_writes_an_imagefolder_with_metadata(captioned):
    out, splits = captioned
    for split, count in (("train", 50), ("val", 20)):
        rows = splits[split]
        assert len(rows) == count
        assert sorted(p.name for p in (out / split).glob("*.png")) == sorted(r["file_name"] for r in rows)
        keys = {"file_name", "text", "label"} | set(ATTRIBUTES) | {f"{a}_value" for a in ATTRIBUTES}
        assert all(set(row) == keys for row in rows)
        with Image.open(out / split / rows[0]["file_name"]) as image:
            assert (image.mode, image.size) == ("L", (28, 28))
    assert len({row["label"] for row in splits["train"]}) == 10


def test_captions_say_what_the_png_measures(captioned):
    out, splits = captioned
    thresholds = train_thresholds(DATA_DIR)
    for split, rows in splits.items():
        pngs = [read_png(out / split / row["file_name"]) for row in rows]
        images = torch.from_numpy(np.stack(pngs)).unsqueeze(1)  # uint8 (N, 1, 28, 28)
        values, classes = measure(images), classify(measure(images), thresholds)
        for i, row in enumerate(rows):
            text = row["text"]
            assert digits_named(text) == {row["label"]}, text
            for name in ATTRIBUTES:
                assert row[name] == classes[name][i], (split, row)
                assert row[f"{name}_value"] == pytest.approx(float(values[name][i]), abs=1e-3)
                for c, mention in MENTIONS[name].items():  # its own class named, the others not
                    assert bool(re.search(mention, text)) == (c == row[name]), (name, text)
    assert len({skeleton(row["text"]) for row in splits["train"]}) >= 3  # several phrasings


def test_digit_phrasing_names_only_the_digit(compose_cfg, tmp_path):
    # In-process (the installed command is exercised above): same run(cfg), without a second startup.
    make_captions.run(compose_cfg("n=50", "n_val=20", "phrasing=digit", config_name="make_captions"))
    rows = [json.loads(line) for split in ("train", "val") for line in read_lines(tmp_path / split)]
    assert len(rows) == 70
    for row in rows:
        assert digits_named(row["text"]) == {row["label"]}, row["text"]
        assert not re.search(ATTRIBUTE_WORDS, row["text"]), row["text"]
        assert row["thickness"] in ATTRIBUTES["thickness"]  # the columns are still measured
    assert len({skeleton(row["text"]) for row in rows}) >= 3


def test_zero_images_fail_in_one_line(tmp_path):
    result = run_cli("dlab-make-captions", "n=0", f"out={tmp_path / 'caps'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: n=0"), result.stderr
    assert not (tmp_path / "caps" / "train").exists()


def test_unknown_phrasing_lists_the_choices(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"phrasing='poem'.*attributes, digit"):
        make_captions.run(compose_cfg("phrasing=poem", config_name="make_captions"))
    assert not (tmp_path / "train").exists()
