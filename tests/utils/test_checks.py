"""Argument checks: each bad value is a ConfigError naming the key and the value (the commands that use
them are run as users run them in tests/commands/test_trust.py)."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import checks


@pytest.mark.parametrize(
    ("value", "good"), [(5, True), (0, False), (-5, False), (2.5, False), ("3", False), (True, False)]
)
def test_positive_int(value, good):
    cfg = OmegaConf.create({"n": value})
    if good:
        assert checks.positive_int(cfg, "n", 100) == value
    else:
        with pytest.raises(ConfigError, match=f"n={value!r}: expected a positive whole number, e.g. n=100"):
            checks.positive_int(cfg, "n", 100)


def test_guidance_scales_are_floats_from_a_scalar_or_a_list():
    assert checks.guidance_scales(OmegaConf.create({"guidance": 2})) == [2.0]
    assert checks.guidance_scales(OmegaConf.create({"guidance": [0, 1.5]})) == [0.0, 1.5]
    for bad in ["abc", -1, [], [1, "x"]]:
        with pytest.raises(ConfigError, match="guidance="):
            checks.guidance_scales(OmegaConf.create({"guidance": bad}))


def test_class_labels_must_be_whole_numbers():
    assert checks.class_labels(OmegaConf.create({"labels": None})) is None
    assert checks.class_labels(OmegaConf.create({"labels": 3})) == [3]
    for bad in [["a"], [-1], [1.5], []]:
        with pytest.raises(ConfigError, match="labels="):
            checks.class_labels(OmegaConf.create({"labels": bad}))


def test_prompts_from_a_list_or_a_file(tmp_path):
    assert checks.prompts(OmegaConf.create({"prompts": "a seven"})) == ["a seven"]
    (tmp_path / "p.txt").write_text("a seven\n\n  a thin one \n")
    assert checks.prompts(OmegaConf.create({"prompts_file": str(tmp_path / "p.txt")})) == [
        "a seven",
        "a thin one",
    ]
    with pytest.raises(ConfigError, match="prompts_file=.*no such file"):
        checks.prompts(OmegaConf.create({"prompts_file": str(tmp_path / "gone.txt")}))
    with pytest.raises(ConfigError, match="not both"):
        checks.prompts(OmegaConf.create({"prompts": "x", "prompts_file": str(tmp_path / "p.txt")}))


def test_writable_dir_names_the_key(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert checks.writable_dir(tmp_path / "new" / "dir").is_dir()
    with pytest.raises(ConfigError, match="out=.*a_file/x: cannot write there"):
        checks.writable_dir(tmp_path / "a_file" / "x")


def test_guidance_interval_is_null_or_two_increasing_noise_levels():
    assert checks.guidance_interval(OmegaConf.create({"guidance_interval": None})) is None
    assert checks.guidance_interval(OmegaConf.create({"guidance_interval": [0, 5]})) == (0.0, 5.0)
    assert checks.guidance_interval(OmegaConf.create({"guidance_interval": [0.3, math.inf]})) == (
        0.3,
        math.inf,
    )
    for bad in ([5, 1], [1], [-1, 2], "abc", [1, True], [2, 2]):
        with pytest.raises(ConfigError, match=r"guidance_interval=.*σ_lo < σ_hi"):
            checks.guidance_interval(OmegaConf.create({"guidance_interval": bad}))
