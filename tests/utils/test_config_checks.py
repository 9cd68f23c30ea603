"""Config mistakes found before anything is built: each one line naming the key, its value and an example."""

from __future__ import annotations

import logging
import typing

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import config_checks
from diffusion_lab.utils.config_checks import check_run_config, unread_additions
from diffusion_lab.utils.instantiate import build, guilty_key

BAD_VALUES = [
    # (override, what the line must name)
    ("data.batch_size=0", ["data.batch_size=0", "positive whole number", "data.batch_size=128"]),
    ("data.batch_size=-1", ["data.batch_size=-1", "positive whole number", "data.batch_size=128"]),
    ("optimizer.lr=-1", ["optimizer.lr=-1", "AdamW", "Invalid learning rate", "e.g. optimizer.lr=0.001"]),
    ("trainer.max_steps=abc", ["trainer.max_steps='abc'", "Trainer expects a whole number", "e.g. trainer.max_steps=-1"]),
    ("schedule.num_timesteps=0", ["schedule.num_timesteps=0", "NoiseSchedule", ">= 2", "e.g. schedule.num_timesteps=1000"]),
    ("schedule.num_timesteps=1", ["schedule.num_timesteps=1", ">= 2"]),
    ("+trainer.max_step=5", ["trainer.max_step: Trainer takes no argument 'max_step' (did you mean max_steps"]),
    ("trainer.precision=17", ["trainer.precision=17", "one of 64, 32, 16"]),
]  # fmt: skip


@pytest.mark.parametrize(("override", "named"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key_before_anything_is_built(compose_cfg, override, named):
    cfg = compose_cfg("debug=tiny", override)
    with pytest.raises(ConfigError) as caught:
        check_run_config(cfg)
    message = str(caught.value)
    assert "\n" not in message
    for part in named:
        assert part in message


def test_sampler_steps_beyond_the_schedule_name_both_keys(compose_cfg):
    cfg = compose_cfg("debug=tiny", "schedule.num_timesteps=10", "sampler.num_steps=20")
    with pytest.raises(
        ConfigError,
        match=r"steps=20: the training schedule has 10 timesteps, so use 1 to 10 .*sampler.num_steps",
    ):
        check_run_config(cfg)


@pytest.mark.parametrize("experiment", ["mnist_cpu", "mnist_best", "mnist_text_cross_attn"])
def test_good_configs_pass(compose_cfg, experiment):
    check_run_config(compose_cfg(f"experiment={experiment}", "trainer=cpu"))


def test_build_names_the_key_a_constructor_refuses(compose_cfg):
    cfg = compose_cfg("debug=tiny", "schedule.kind=cubic")  # a ConfigError written for users: unchanged
    with pytest.raises(ConfigError, match="^Unknown schedule kind 'cubic'"):
        build("schedule", cfg.schedule)
    cfg = compose_cfg("debug=tiny", "+model.widht=3")  # check_run_config would have caught it first
    with pytest.raises(ConfigError, match=r"^model.widht=3 is refused by ConditionalUNet \(.*'widht'\)"):
        build("net", cfg.model)


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ("Invalid learning rate: -1", "lr"),  # the only value quoted
        ("batch_size should be a positive integer value, but got batch_size=0", "batch_size"),  # named
        ("Invalid beta parameter at index 1: 2.0", None),  # 2.0 is no value of the node: cannot tell
        ("got an unexpected keyword argument 'foo'", "nested.foo"),
        ("batch_size must be at most 1e-08", "batch_size"),  # a key named wins over a value quoted
    ],
)
def test_guilty_key(message, key):
    node = OmegaConf.create({"_target_": "x", "lr": -1, "batch_size": 0, "eps": 1e-8, "nested": {"foo": 3}})
    assert guilty_key(node, message) == key


@pytest.mark.parametrize(
    ("overrides", "unread"),
    [
        (["+foo=1", "seed=3"], ["foo"]),
        (["+paths.extra=1", "++bar=2"], ["paths.extra"]),  # `++` may set a key that exists: not judged
        (["+trainer.profiler=simple", "+callbacks.mine._target_=x.Y"], []),  # built: the constructor reads it
        (["+experiment=mnist_adaln", "+hparams_search@x=y"], []),  # config groups
        (["+sampler.num_steps=5", "+model.extra=1"], []),  # built nodes of the train config
    ],
)
def test_unread_additions(compose_cfg, overrides, unread):
    cfg = compose_cfg("+callbacks.mine._target_=x.Y", "+trainer.profiler=simple")
    assert unread_additions(cfg, overrides, groups={"experiment", "trainer"}) == unread


def test_unread_addition_is_warned_with_its_name(compose_cfg, monkeypatch, caplog):
    cfg = compose_cfg("+foo=1", "+trainer.profiler=simple")
    hydra = OmegaConf.create(
        {"overrides": {"task": ["+foo=1", "+trainer.profiler=simple"]}, "runtime": {"choices": {}}}
    )
    monkeypatch.setattr(config_checks.HydraConfig, "get", staticmethod(lambda: hydra))
    with caplog.at_level(logging.WARNING, logger="diffusion_lab"):
        config_checks.warn_unread_additions(cfg)
    assert "nothing reads" in caplog.text and "+foo" in caplog.text and "profiler" not in caplog.text


def test_yaml_syntax_error_in_a_user_config_folder_names_file_line_and_column(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "good.yaml").write_text("seed: 1\n")
    broken = tmp_path / "experiment" / "my_exp.yaml"
    broken.write_text("# @package _global_\ntrainer:\n  max_steps: [1, 2\nseed: 3\n")
    for argv in (
        [f"hydra.searchpath=[file://{tmp_path}]", "experiment=my_exp"],
        ["--config-dir", str(tmp_path)],
    ):
        with pytest.raises(
            ConfigError, match=rf"^{broken}, line 4, column 5: not valid YAML \(.*expected ',' or ']'"
        ):
            config_checks.check_user_config_files(argv)
    broken.write_text("seed: 3\n")
    config_checks.check_user_config_files([f"hydra.searchpath=[file://{tmp_path},pkg://diffusion_lab]"])


@pytest.mark.parametrize(
    ("annotation", "value", "verdict"),
    [
        (int | None, None, True), (int | None, "abc", False), (int, True, False), (float, 1, True),
        (typing.Literal[16, "bf16"], "16", False), (typing.Literal[16, "bf16"], 16, True),
        (list[int] | str, 3, None), (list[int] | int, 3, True), (torch.Tensor | None, 1, None),
    ],
)  # fmt: skip
def test_accepts_reads_plain_annotations(annotation, value, verdict):
    assert config_checks._accepts(annotation, value) is verdict
