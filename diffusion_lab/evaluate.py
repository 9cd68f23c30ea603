"""`dlab-eval`: a checkpoint -> FID / KID / conditional accuracy against guidance and sampling steps.

Writes `eval.json`, `guidance.png` and (unless `steps_sweep.samplers=[]`) `steps.png` to the run folder
and logs them to the logger. Every FID comes with the real-vs-real floor at the same N (`fid_real_floor`),
every spatial condition's fidelity (`spatial_fidelity.SCORES`) with what real digits score against their
own maps (`fidelity_real_floor`). Several conditions can be swept over a grid of per-condition scales, which
guidance.png draws as a heat-map per score for two.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.callbacks.post_hoc_ema import post_hoc_module
from diffusion_lab.cli import hydra_app
from diffusion_lab.eval_checks import check_arguments, check_guidance_names, ema_lengths, sweep_scales
from diffusion_lab.eval_plots import line_panels, plot_heatmaps, save_figure
from diffusion_lab.inference import (
    generate_batched,
    load_guidance_model,
    load_module,
    pick_device,
    resolve_sampler,
)
from diffusion_lab.metrics import provenance as prov
from diffusion_lab.metrics.attributes import agreement, train_thresholds
from diffusion_lab.metrics.fid import MNISTEvaluator
from diffusion_lab.metrics.spatial_fidelity import SCORES
from diffusion_lab.metrics.targets import Targets, targets_for
from diffusion_lab.utils import checks

log = logging.getLogger("diffusion_lab")


def guidance_key(scale: float | dict[str, float]) -> str:
    """A guidance row's key in eval.json and the logs: `2.0`, or `sketch=1.5,text=3` per condition."""
    if isinstance(scale, dict):
        return ",".join(f"{name}={s:g}" for name, s in scale.items())
    return str(scale)


def score(evaluator, module, sampler, targets: Targets, guidance, cfg: DictConfig, weak=None) -> dict:
    """FID / KID / digit accuracy of samples for `targets`, plus caption fidelity for a caption model and
    the mean fidelity to each spatial condition (`spatial_fidelity.SCORES`) for a spatial one. `weak`: the
    model autoguidance guides against (`guidance_model=`), else classifier-free guidance."""
    interval = checks.guidance_interval(cfg)
    images = generate_batched(
        module, targets.inputs, guidance, sampler, cfg.batch_size, cfg.seed,
        guidance_interval=interval, guidance_form=cfg.guidance_form, guidance_model=weak,
    )  # fmt: skip
    result = evaluator.evaluate(images, targets.digits)
    if targets.attributes:
        result["attribute_agreement"] = agreement(
            images, targets.attributes, train_thresholds(cfg.paths.data_dir)
        )
    return result | targets.fidelity(images)


def sampler_factories(cfg: DictConfig) -> tuple:
    """(the guidance sweep's sampler partial, or None for the run's own; {name: partial} of the steps
    sweep), instantiated from their configs before the model loads."""
    own = instantiate(cfg.sampler) if cfg.get("sampler") else None
    return own, {name: instantiate(cfg.samplers[name]) for name in cfg.steps_sweep.samplers}


def guidance_sweep(cfg: DictConfig, evaluator, module, sampler, targets: Targets, weak=None) -> dict:
    """The results' `sampler`, `guidance_interval`, `guidance_form`, `guidance` (a row per scale or grid
    point, keyed by `guidance_key`), `fid_real_floor` and, for spatial conditions, `fidelity_real_floor`."""
    results = {"sampler": {"name": type(sampler).__name__, "steps": sampler.num_steps}}
    interval = checks.guidance_interval(cfg) or checks.EVERY_STEP
    # JSON has no infinity: an open upper bound is written "inf".
    results["guidance_interval"] = [b if math.isfinite(b) else "inf" for b in interval]
    results["guidance_form"] = cfg.guidance_form
    results["guidance"] = {}
    for scale in sweep_scales(cfg):  # floats, so guidance=[1] and [1.0] give the same keys
        key = guidance_key(scale)
        results["guidance"][key] = row = score(evaluator, module, sampler, targets, scale, cfg, weak)
        shown = ("fid", "accuracy", "fid_real_floor", "attribute_agreement", *SCORES.values())
        log.info("guidance %s: %s", key, {k: v for k, v in row.items() if k in shown})
    results["fid_real_floor"] = next(iter(results["guidance"].values()))["fid_real_floor"]
    if targets.maps:
        results["fidelity_real_floor"] = targets.fidelity_floor()
    return results


def ema_sweep(cfg: DictConfig, evaluator, sampler, targets: Targets, weak, device) -> dict:
    """{σ_rel: {guidance key: row}}: the guidance sweep again on the weights post-hoc EMA rebuilds for each
    length of `ema=` (from the run's snapshots: callbacks/post_hoc_ema.py)."""
    sweep = {}
    for sigma_rel in ema_lengths(cfg):
        module, _ = post_hoc_module(cfg.ckpt_path, sigma_rel, device, cfg.paths.train_runs)
        sweep[f"{sigma_rel:g}"] = guidance_sweep(cfg, evaluator, module, sampler, targets, weak)["guidance"]
    return sweep


def plot_ema(cfg: DictConfig, results: dict, out: Path, loggers) -> None:
    """ema.png: a heat-map per score over EMA length (the run's own, then each σ_rel) × guidance."""
    keys = [guidance_key(s) for s in sweep_scales(cfg)]
    by_length = {"run's own": results["guidance"], **results["ema"]}
    grid = [{"guidance": key, "EMA σ_rel": length} for length in by_length for key in keys]
    rows = [by_length[cell["EMA σ_rel"]][cell["guidance"]] for cell in grid]
    floors = {"fid": results["fid_real_floor"], **results.get("fidelity_real_floor", {})}
    save_figure(plot_heatmaps(grid, rows, floors, cfg.n, suffix=""), out / "ema.png", loggers)


def steps_sweep(cfg: DictConfig, evaluator, module, samplers: dict, targets: Targets, weak=None) -> dict:
    """{sampler name: {steps: row}} at `steps_sweep.guidance`; `samplers` holds each name's sampler per
    step count."""
    sweep = cfg.steps_sweep
    (scale,) = checks.guidance_scales(sweep, "guidance")
    return {
        name: {str(s): score(evaluator, module, by_steps[s], targets, scale, cfg, weak) for s in sweep.steps}
        for name, by_steps in samplers.items()
    }


def plot_results(cfg: DictConfig, results: dict, out: Path, loggers) -> None:
    """guidance.png: each score against the scale, or a heat-map per score over a grid of two conditions'
    scales; steps.png unless `steps_sweep.samplers=[]` skipped the sweep (no empty figure)."""
    scales = sweep_scales(cfg)
    rows = [results["guidance"][guidance_key(s)] for s in scales]
    floors = {"fid": results["fid_real_floor"], **results.get("fidelity_real_floor", {})}
    if isinstance(scales[0], dict) and len(scales[0]) == 2:
        fig = plot_heatmaps(scales, rows, floors, cfg.n)
    else:
        xs = scales if isinstance(scales[0], float) else range(len(scales))
        series = {results["sampler"]["name"]: (xs, rows)}
        fig, axes = line_panels(series, floors, xlabel="guidance scale", title=f"N = {cfg.n}")
        if not isinstance(scales[0], float):  # a point per combination of scales, named under it
            for ax in axes.values():
                ax.set_xticks(xs, [guidance_key(s) for s in scales], rotation=30, ha="right")
    save_figure(fig, out / "guidance.png", loggers)
    if results["steps"]:
        sweep = cfg.steps_sweep
        series = {name: (list(sweep.steps), list(rows.values())) for name, rows in results["steps"].items()}
        title = f"N = {sweep.n}, guidance {guidance_key(checks.guidance_scales(sweep, 'guidance')[0])}"
        fig, _ = line_panels(series, {}, xlabel="sampling steps", xscale="log", title=title)
        save_figure(fig, out / "steps.png", loggers)


def provenance_of(cfg: DictConfig, evaluator, module, path, sampler, weak=None, weak_path=None) -> dict:
    """eval.json's `provenance`: what every score here depends on (metrics/provenance.py). NFE counts each
    row's model evaluations per image: guided steps run two passes (CFG, autoguidance) unless s = 1."""
    kind = "cfg" if weak is None else "autoguidance"
    scales = {guidance_key(s): s for s in sweep_scales(cfg)}
    interval = checks.guidance_interval(cfg)
    name, steps, times = type(sampler).__name__, sampler.num_steps, sampler.timesteps.tolist()
    guided = (
        None if interval is None else sum(interval[0] < sampler.noise_level(t) <= interval[1] for t in times)
    )
    nfe = {
        k: prov.nfe(name, steps, kind, s, calls=len(times), guided_calls=guided) for k, s in scales.items()
    }
    return prov.provenance(
        n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size,
        extractor=prov.extractor_identity(evaluator),
        reference=prov.reference_identity(evaluator, cfg.n),
        sampler=prov.sampler_record(name, steps, nfe),
        guidance=prov.guidance_record(kind, scales, interval, cfg.guidance_form, model=weak_path,
                                      model_step=None if weak is None else weak.checkpoint_step),
        ema=prov.ema_record(module.run_config),
        checkpoint=prov.checkpoint_record(path, module.checkpoint_step),
    )  # fmt: skip


def log_results(results: dict, loggers) -> None:
    """The guidance sweep's numbers (and the floors) to every logger, one `eval/<score>@g<key>` each."""
    floors = {"fid": results["fid_real_floor"], **results.get("fidelity_real_floor", {})}
    flat = {f"eval/{name}_real_floor": value for name, value in floors.items()}
    for s, r in results["guidance"].items():
        flat |= {f"eval/{k}@g{s}": r[k] for k in ("fid", "kid_mean", "accuracy", *SCORES.values()) if k in r}
        flat |= {f"eval/agreement_{k}@g{s}": v for k, v in r.get("attribute_agreement", {}).items()}
    for length, by_scale in results.get("ema", {}).items():
        flat |= {f"eval/{k}@ema{length},g{s}": r[k] for s, r in by_scale.items() for k in ("fid", "accuracy")}
    for logger in loggers:
        logger.log_metrics(flat)
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
    check_guidance_names(module, cfg)
    weak = weak_path = None
    if cfg.get("guidance_model") is not None:  # autoguidance against a weaker model instead of the null
        weak, weak_path = load_guidance_model(cfg.guidance_model, module, path, device, cfg.paths.train_runs)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    results = {"checkpoint": str(path), "n": cfg.n, "accuracy_real": evaluator.accuracy_real}

    where = {"captions": cfg.get("captions"), "data_dir": cfg.paths.data_dir, "seed": cfg.seed}
    targets = targets_for(module, cfg.n, **where)
    sweep_targets = targets_for(module, cfg.steps_sweep.n, **where)
    sampler = resolve_sampler(module, own_factory, cfg.steps)
    # Every sampler of the steps sweep is built now, so a step count the schedule lacks fails before sampling.
    sweep_samplers = {
        name: {s: resolve_sampler(module, factory, s) for s in cfg.steps_sweep.steps}
        for name, factory in sweep_factories.items()
    }
    results |= guidance_sweep(cfg, evaluator, module, sampler, targets, weak)
    results["provenance"] = provenance_of(cfg, evaluator, module, path, sampler, weak, weak_path)
    results["steps"] = steps_sweep(cfg, evaluator, module, sweep_samplers, sweep_targets, weak)
    if ema_lengths(cfg):
        results["ema"] = ema_sweep(cfg, evaluator, sampler, targets, weak, device)
    results["seconds"] = time.perf_counter() - start

    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot_results(cfg, results, out, loggers)
    if "ema" in results:
        plot_ema(cfg, results, out, loggers)
    log_results(results, loggers)
    log.info("wrote %s (%.0f s)", out / "eval.json", results["seconds"])
    return results


@hydra_app("eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
