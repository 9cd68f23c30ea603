"""Resume refusal: every key added, removed or changed since the checkpoint is named; allowed ones are not."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils.resume import check_resume_config

SAVED = {
    "seed": 0,
    "model": {"channels": [16, 32], "attention": None},
    "optimizer": {"lr": 0.002},
    "trainer": {"max_steps": 100},
    "callbacks": {},
}
CKPT = Path("/runs/a/checkpoints/last.ckpt")


def _now(**changes) -> dict:
    now = OmegaConf.to_container(OmegaConf.create(SAVED))
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = now
        for parent in parents:
            node = node[parent]
        if value is REMOVED:
            del node[leaf]
        else:
            node[leaf] = value
    return now


REMOVED = object()


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"optimizer__lr": 0.001}, "optimizer.lr: 0.002 in the checkpoint, 0.001 now"),  # changed
        ({"model__dropout": 0.1}, "model.dropout: <absent> in the checkpoint, 0.1 now"),  # added
        ({"model__norm": None}, "model.norm: <absent> in the checkpoint, None now"),  # added as null
        ({"model__attention": REMOVED}, "model.attention: None in the checkpoint, <absent> now"),  # removed
        ({"data": {}}, "data: <absent> in the checkpoint, {} now"),  # an empty node added
    ],
)
def test_every_added_removed_or_changed_key_is_named(changes, line):
    with pytest.raises(ConfigError) as caught:
        check_resume_config(SAVED, OmegaConf.create(_now(**changes)), CKPT)
    assert line in str(caught.value)
    assert str(caught.value).count(" in the checkpoint, ") == 1  # that key alone


@pytest.mark.parametrize(
    "changes",
    [{}, {"trainer__max_steps": 200}, {"trainer__accelerator": "cpu"}, {"callbacks__extra": {"a": 1}}],
)
def test_keys_a_resume_may_change_pass(changes):
    check_resume_config(SAVED, OmegaConf.create(_now(**changes)), CKPT)
