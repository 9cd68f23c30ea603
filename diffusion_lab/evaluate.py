"""`dlab-eval`: a checkpoint -> FID / KID / conditional accuracy against guidance and sampling steps.

Writes `eval.json`, `guidance.png` and (unless `steps_sweep.samplers=[]`) `steps.png` to the run folder
and logs them to the logger.
Every FID is reported with the real-vs-real floor at the same N (`fid_real_floor`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import generate_batched, load_module, pick_device, resolve_sampler
from diffusion_lab.metrics.attributes import agreement, train_thresholds
from diffusion_lab.metrics.fid import MNISTEvaluator
from diffusion_lab.metrics.targets import Targets, targets_for
from diffusion_lab.utils import checks
from diffusion_lab.utils.plots import plt

log = logging.getLogger("diffusion_lab")

# FID's full-rank bound (2 × feature dim) for the evaluator dlab-train-evaluator trains by default (128
# features), checked before the evaluator is asked for; the loaded evaluator checks its own bound again.
MIN_FID_IMAGES = 256


def score(evaluator, module, sampler, targets: Targets, guidance: float, cfg: DictConfig) -> dict:
    """FID / KID / digit accuracy of samples for `targets`, plus caption fidelity for a caption model."""
    interval = checks.guidance_interval(cfg)
    images = generate_batched(
        module, targets.inputs, guidance, sampler, cfg.batch_size, cfg.seed, guidance_interval=interval
    )
    result = evaluator.evaluate(images, targets.digits)
    if targets.attributes:
        result["attribute_agreement"] = agreement(
            images, targets.attributes, train_thresholds(cfg.paths.data_dir)
        )
    return result


def plot_sweep(ax_fid, ax_acc, xs, rows: list[dict], label: str, floor: float | None = None) -> None:
    ax_fid.plot(xs, [r["fid"] for r in rows], "o-", label=label)
    ax_acc.plot(xs, [r["accuracy"] for r in rows], "o-", label=label)
    if floor is not None:
        ax_fid.axhline(floor, color="grey", ls="--", label="real-vs-real floor")


def save_figure(fig, path: Path, loggers) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    for logger in loggers:  # image loggers get the plot too; CSV keeps the numbers
        if hasattr(logger, "log_image"):
            logger.log_image(f"eval/{path.stem}", images=[str(path)])
        elif hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure(f"eval/{path.stem}", fig, close=False)
    plt.close(fig)  # after the loggers: TensorBoard renders the figure itself


def enough_for_fid(cfg: DictConfig, key: str) -> None:
    n = checks.positive_int(cfg, key, 5000)
    if n < MIN_FID_IMAGES:
        raise ConfigError(
            f"{key}={n}: FID needs at least {MIN_FID_IMAGES} images (2 × the evaluator's feature dim) for "
            f"a full-rank covariance; got N={n}. Raise {key}, e.g. {key}=5000"
        )


def check_arguments(cfg: DictConfig) -> None:
    enough_for_fid(cfg, "n")
    checks.guidance_scales(cfg)
    checks.guidance_interval(cfg)
    checks.optional_positive_int(cfg, "steps", 20)
    checks.positive_int(cfg, "batch_size", 500)
    checks.non_negative_int(cfg, "seed", 0)
    enough_for_fid(cfg, "steps_sweep.n")
    checks.guidance_scales(cfg.steps_sweep, "guidance")
    for steps in checks.as_list(cfg.steps_sweep.steps):
        checks.positive_int(OmegaConf.create({"steps_sweep": {"steps": steps}}), "steps_sweep.steps", 20)
    unknown = set(checks.as_list(cfg.steps_sweep.samplers)) - set(cfg.samplers)
    if unknown:
        raise ConfigError(
            f"steps_sweep.samplers={list(cfg.steps_sweep.samplers)}: {sorted(unknown)} unknown; "
            f"choose from {sorted(cfg.samplers)}"
        )


def sampler_factories(cfg: DictConfig) -> tuple:
    """(the guidance sweep's sampler partial, or None for the run's own; {name: partial} of the steps
    sweep), instantiated from their configs before the model loads."""
    own = instantiate(cfg.sampler) if cfg.get("sampler") else None
    return own, {name: instantiate(cfg.samplers[name]) for name in cfg.steps_sweep.samplers}


def guidance_sweep(cfg: DictConfig, evaluator, module, sampler, targets: Targets) -> dict:
    """The results' `sampler`, `guidance_interval`, `guidance` (a row per scale) and `fid_real_floor`."""
    results = {"sampler": {"name": type(sampler).__name__, "steps": sampler.num_steps}}
    interval = checks.guidance_interval(cfg) or checks.EVERY_STEP
    # JSON has no infinity: an open upper bound is written "inf".
    results["guidance_interval"] = [b if math.isfinite(b) else "inf" for b in interval]
    results["guidance"] = {}
    for scale in checks.guidance_scales(cfg):  # floats, so guidance=[1] and [1.0] give the same keys
        results["guidance"][str(scale)] = score(evaluator, module, sampler, targets, scale, cfg)
        log.info("guidance %g: %s", scale, {k: v for k, v in results["guidance"][str(scale)].items()
                                             if k in ("fid", "accuracy", "fid_real_floor", "attribute_agreement")})  # fmt: skip
    results["fid_real_floor"] = next(iter(results["guidance"].values()))["fid_real_floor"]
    return results


def steps_sweep(cfg: DictConfig, evaluator, module, samplers: dict, targets: Targets) -> dict:
    """{sampler name: {steps: row}} at `steps_sweep.guidance`; `samplers` holds each name's sampler per
    step count."""
    sweep = cfg.steps_sweep
    return {
        name: {
            str(s): score(evaluator, module, by_steps[s], targets, sweep.guidance, cfg) for s in sweep.steps
        }
        for name, by_steps in samplers.items()
    }


def plot_results(cfg: DictConfig, results: dict, out: Path, loggers) -> None:
    """guidance.png, and steps.png unless `steps_sweep.samplers=[]` skipped the sweep (no empty figure)."""
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    plot_sweep(ax_fid, ax_acc, checks.guidance_scales(cfg), list(results["guidance"].values()),
               results["sampler"]["name"], results["fid_real_floor"])  # fmt: skip
    ax_fid.set(xlabel="guidance scale", ylabel="FID-MNIST", yscale="log", title=f"N = {cfg.n}")
    ax_acc.set(xlabel="guidance scale", ylabel="conditional accuracy", ylim=(0, 1.02))
    ax_fid.legend()
    save_figure(fig, out / "guidance.png", loggers)
    if results["steps"]:
        sweep = cfg.steps_sweep
        fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        for name, rows in results["steps"].items():
            plot_sweep(ax_fid, ax_acc, list(sweep.steps), list(rows.values()), name)
        ax_fid.set(xlabel="sampling steps", ylabel="FID-MNIST", xscale="log", yscale="log",
                   title=f"N = {sweep.n}, guidance {sweep.guidance:g}")  # fmt: skip
        ax_acc.set(xlabel="sampling steps", ylabel="conditional accuracy", xscale="log", ylim=(0, 1.02))
        ax_fid.legend()
        save_figure(fig, out / "steps.png", loggers)


def log_results(results: dict, loggers) -> None:
    """The guidance sweep's numbers (and the floor) to every logger, one `eval/<metric>@g<scale>` each."""
    flat = {
        f"eval/{k}@g{s}": r[k]
        for s, r in results["guidance"].items()
        for k in ("fid", "kid_mean", "accuracy")
    }
    flat |= {
        f"eval/agreement_{name}@g{s}": value
        for s, r in results["guidance"].items()
        for name, value in r.get("attribute_agreement", {}).items()
    }
    for logger in loggers:
        logger.log_metrics(flat | {"eval/fid_real_floor": results["fid_real_floor"]})
        logger.save()


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    check_arguments(cfg)
    own_factory, sweep_factories = sampler_factories(cfg)
    device = pick_device(cfg.device)
    out = checks.writable_dir(cfg.paths.output_dir)
    evaluator = MNISTEvaluator.from_cache(cfg.paths.cache_dir, cfg.paths.data_dir)
    evaluator.require(cfg.n)
    evaluator.require(cfg.steps_sweep.n, "steps_sweep.n")
    module, path = load_module(cfg.ckpt_path, device, cfg.paths.train_runs)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    results = {"checkpoint": str(path), "n": cfg.n, "accuracy_real": evaluator.accuracy_real}

    targets = targets_for(module, cfg.n, cfg.get("captions"))
    sweep_targets = targets_for(module, cfg.steps_sweep.n, cfg.get("captions"))
    sampler = resolve_sampler(module, own_factory, cfg.steps)
    # Every sampler of the steps sweep is built now, so a step count the schedule lacks fails before sampling.
    sweep_samplers = {
        name: {s: resolve_sampler(module, factory, s) for s in cfg.steps_sweep.steps}
        for name, factory in sweep_factories.items()
    }
    results |= guidance_sweep(cfg, evaluator, module, sampler, targets)
    results["steps"] = steps_sweep(cfg, evaluator, module, sweep_samplers, sweep_targets)
    results["seconds"] = time.perf_counter() - start

    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot_results(cfg, results, out, loggers)
    log_results(results, loggers)
    log.info("wrote %s (%.0f s)", out / "eval.json", results["seconds"])
    return results


@hydra_app("eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
