"""dlab-eval's arguments, checked before the model or the evaluator loads (and the model's condition names
once it has): each mistake is one line naming the key, what was expected and an example."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.diffusion.guidance import FORMS
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import CombinedEncoder
from diffusion_lab.utils import checks
from diffusion_lab.utils.post_hoc_ema import sigma_rel_to_gamma

# FID's full-rank bound (2 × feature dim) for the evaluator dlab-train-evaluator trains by default (128
# features), checked before the evaluator is asked for; the loaded evaluator checks its own bound again.
MIN_FID_IMAGES = 256
# guidance=null: conditional, the default recipe's best point (benchmarks/README.md), over-guided.
DEFAULT_SCALES = [1.0, 1.6, 2.0]


def sweep_scales(cfg: DictConfig) -> list[float | dict[str, float]]:
    """The scales `guidance=` asks for (`checks.guidance_scales`); null: DEFAULT_SCALES. (A null default,
    not a list, so that `guidance='{sketch: [1, 2], text: [1, 3]}'` can replace it on the command line.)"""
    return checks.optional_guidance_scales(cfg) or DEFAULT_SCALES


def enough_for_fid(cfg: DictConfig, key: str) -> None:
    n = checks.positive_int(cfg, key, 5000)
    if n < MIN_FID_IMAGES:
        raise ConfigError(
            f"{key}={n}: FID needs at least {MIN_FID_IMAGES} images (2 × the evaluator's feature dim) for "
            f"a full-rank covariance; got N={n}. Raise {key}, e.g. {key}=5000"
        )


def ema_lengths(cfg: DictConfig) -> list[float]:
    """`ema=`: the post-hoc EMA lengths (σ_rel) to sweep with guidance, each in the reachable range; [] when
    none are asked for."""
    lengths = [] if cfg.get("ema") is None else checks.as_list(cfg.ema)
    for length in lengths:
        if not checks.is_number(length):
            raise ConfigError(
                f"ema={lengths}: expected post-hoc EMA lengths (σ_rel, numbers), e.g. ema=[0.05,0.1,0.15]"
            )
        sigma_rel_to_gamma(float(length))
    return [float(length) for length in lengths]


def check_arguments(cfg: DictConfig) -> None:
    enough_for_fid(cfg, "n")
    ema_lengths(cfg)
    sweep_scales(cfg)
    checks.guidance_interval(cfg)
    if cfg.guidance_form not in FORMS:
        raise ConfigError(
            f"guidance_form={cfg.guidance_form!r}: expected one of {', '.join(FORMS)} (how per-condition "
            "scales combine, conf/eval.yaml), e.g. guidance_form=nested"
        )
    checks.optional_positive_int(cfg, "steps", 20)
    checks.positive_int(cfg, "batch_size", 500)
    checks.non_negative_int(cfg, "seed", 0)
    enough_for_fid(cfg, "steps_sweep.n")
    if len(checks.guidance_scales(cfg.steps_sweep, "guidance")) != 1:
        raise ConfigError(
            f"steps_sweep.guidance={OmegaConf.to_container(cfg.steps_sweep.guidance)}: expected one scale "
            "(a number, or one per condition), e.g. steps_sweep.guidance=1.6"
        )
    for steps in checks.as_list(cfg.steps_sweep.steps):
        checks.positive_int(OmegaConf.create({"steps_sweep": {"steps": steps}}), "steps_sweep.steps", 20)
    unknown = set(checks.as_list(cfg.steps_sweep.samplers)) - set(cfg.samplers)
    if unknown:
        raise ConfigError(
            f"steps_sweep.samplers={list(cfg.steps_sweep.samplers)}: {sorted(unknown)} unknown; "
            f"choose from {sorted(cfg.samplers)}"
        )


def check_guidance_names(module, cfg: DictConfig) -> None:
    """Per-condition scales name conditions this model takes: checked once it loads, before sampling."""
    names = list(module.encoder.sources) if isinstance(module.encoder, CombinedEncoder) else []
    for key, scales in (
        ("guidance", sweep_scales(cfg)),
        ("steps_sweep.guidance", checks.guidance_scales(cfg.steps_sweep, "guidance")),
    ):
        named = list(dict.fromkeys(name for scale in scales if isinstance(scale, dict) for name in scale))
        unknown = [name for name in named if name not in names]
        if unknown:
            raise ConfigError(
                f"{key} names {', '.join(unknown)}, which this model does not take; its conditions are "
                f"{', '.join(names)}, e.g. {key}='{{{names[0]}: 1.5}}'"
                if names
                else f"{key} gives one scale per condition ({', '.join(named)}), but this model has one "
                f"condition ({module.encoder.input_key}): give numbers, e.g. {key}=[1,2]"
            )
