"""Caption fidelity as `dlab-eval` computes it (`targets.targets_for` picks the held-out captions,
`attributes.agreement` scores images against them), on real held-out digits from `dlab-make-captions`:
asked for their own captions they agree on every attribute, with shuffled captions only by chance."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.metrics.attributes import ATTRIBUTES, agreement, train_thresholds
from diffusion_lab.metrics.targets import targets_for
from tests.conftest import DATA_DIR


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def held_out(captioned_mnist):
    """(the targets dlab-eval asks a caption model for, the held-out digits in the same order)."""
    run_config = {"data": {"root": str(captioned_mnist / "train"), "val_root": str(captioned_mnist / "val")}}
    model = SimpleNamespace(encoder=SimpleNamespace(input_key="caption"), run_config=run_config)
    val = rows(captioned_mnist / "val")
    targets = targets_for(model, len(val))  # no captions=: the run's data.val_root
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(captioned_mnist / "val" / r["file_name"]))) for r in val]
    )
    return targets, images.unsqueeze(1)  # uint8 (N, 1, 28, 28)


def test_the_captions_scored_are_the_held_out_files(held_out, captioned_mnist):
    targets, _ = held_out
    val, train = rows(captioned_mnist / "val"), rows(captioned_mnist / "train")
    assert targets.inputs == [r["text"] for r in val]
    assert targets.digits.tolist() == [r["label"] for r in val]
    assert targets.attributes == {name: [r[name] for r in val] for name in ATTRIBUTES}
    assert [r["text"] for r in train[: len(val)]] != targets.inputs  # the train file would differ


def test_digits_asked_for_their_own_captions_agree_on_every_attribute(held_out):
    targets, images = held_out
    scores = agreement(images, targets.attributes, train_thresholds(DATA_DIR))
    # Exactly 1: the captions were measured from these very pixels (PNG is lossless), by the same code.
    assert scores == {name: 1.0 for name in ATTRIBUTES}
    as_float = agreement(images.float() / 127.5 - 1, targets.attributes, train_thresholds(DATA_DIR))
    assert as_float == scores  # generated samples come as [-1, 1] floats


def test_shuffled_captions_agree_only_by_chance(held_out):
    """Chance is the share of pairs whose classes match by luck: about 1/3 (the classes are tertiles)."""
    targets, images = held_out
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = {name: [wanted[i] for i in order] for name, wanted in targets.attributes.items()}
    scores = agreement(images, shuffled, train_thresholds(DATA_DIR))
    for name, wanted in targets.attributes.items():
        shares = np.array([wanted.count(c) for c in ATTRIBUTES[name]]) / len(wanted)
        chance = float((shares**2).sum())  # the expected agreement of a random pairing
        assert scores[name] == pytest.approx(chance, abs=0.15), (name, scores[name], chance)
        assert scores[name] < 0.6
