"""`dlab-demo`: a web page (Gradio) to try a trained model: its own conditions (a digit, a prompt, a
sketch pad), a guidance slider per condition, the sampler and steps; x̂₀ streams while it samples, Stop
stops it, and the shown samples download as dlab-sample's samples.npz + samples.png. `compare=<run>`
puts a second model beside the first, with the same inputs and seed.

This file is the command: it loads the models, tells what each run is (its config, final metrics and
validation grid), and serves the page (demo_page.py) until SIGINT or SIGTERM, which stop the running
sampling and close the server (exit 0: stopping is how a server is meant to end). The page listens on
127.0.0.1 unless `host=` says otherwise.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab import demo_page
from diffusion_lab.cli import hydra_app
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import guidance_for, load_module, pick_device, spatial_encoders
from diffusion_lab.utils import checks
from diffusion_lab.utils.checkpoints import run_dir_of

log = logging.getLogger("diffusion_lab")


@dataclass
class DemoModel:
    """A loaded checkpoint and what the page says about its run."""

    module: torch.nn.Module
    path: Path
    summary: str  # markdown: the run's config and final metrics
    grid: Path | None  # the run's newest validation grid

    @property
    def name(self) -> str:
        return run_dir_of(self.path).name


def _short(target: str | None) -> str:
    return (target or "?").rsplit(".", 1)[-1]


def _condition_words(condition: dict) -> str:
    """`ClassEncoder (10 classes)` or `CombinedEncoder: sketch (SpatialEncoder), text (LearnedTextEncoder)`."""
    if "sources" in condition:
        parts = ", ".join(f"{n} ({_short(s.get('_target_'))})" for n, s in condition["sources"].items())
        return f"{_short(condition['_target_'])}: {parts}"
    classes = f" ({condition['num_classes']} classes)" if "num_classes" in condition else ""
    return _short(condition.get("_target_")) + classes


def run_summary(module, path: Path, step: int | None) -> str:
    """Markdown: the run folder and checkpoint, its model, conditioning, schedule, sampler and steps trained,
    and the final metrics of its metrics.json (written when training finished)."""
    cfg = module.run_config or {}
    model, schedule = cfg.get("model", {}), cfg.get("schedule", {})
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    rows = {
        "checkpoint": f"`{path.name}`, step {step if step is not None else '?'}",
        "model": f"{_short(model.get('_target_'))}, channels {model.get('channels')}, "
        f"{module.net.image_size}×{module.net.image_size}×{module.net.in_channels}, {params:.2f} M parameters",
        "condition": _condition_words(cfg.get("condition", {})),
        "conditioning": _short(cfg.get("conditioning", {}).get("_target_")),
        "schedule": f"{schedule.get('kind')}, {schedule.get('num_timesteps')} steps, "
        f"{module.hparams.prediction_type}",
        "sampler": f"{_short(cfg.get('sampler', {}).get('_target_'))}, {cfg.get('sampler', {}).get('num_steps')} steps",
        "guidance": guidance_for(module, None)[1].removeprefix("guidance "),
        "tags": ", ".join(cfg.get("tags") or []) or "-",
    }
    lines = [f"**{run_dir_of(path)}**", "", "| config | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    metrics = run_dir_of(path) / "metrics.json"
    if not metrics.is_file():
        return "\n".join(
            [*lines, "", "Final metrics: none yet (the run has no metrics.json: it has not finished)."]
        )
    values = json.loads(metrics.read_text())
    lines += ["", "| final metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in sorted(values.items())]  # fmt: skip
    return "\n".join(lines)


def validation_grid(path: Path) -> Path | None:
    """The newest validation grid (samples/step_*.png) of the checkpoint's run, or None."""
    grids = sorted((run_dir_of(path) / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def _kind(module) -> tuple:
    """What a model takes and gives: its condition inputs and image shape (two compared must agree)."""
    net = module.net
    return module.encoder.input_key, tuple(e.input_key for e in spatial_encoders(module.encoder)), (
        net.in_channels, net.image_size)  # fmt: skip


def load_model(spec, device, runs_dir, like: DemoModel | None = None, key: str = "ckpt_path") -> DemoModel:
    """A checkpoint for the page (a CheckpointError names a missing file or non-finite weights); with `like`,
    one compared with it, which must take the same conditions and give images of the same shape."""
    module, path = load_module(spec, device, runs_dir)
    if like is not None and _kind(module) != _kind(like.module):
        raise ConfigError(
            f"{key}={spec} takes {_kind(module)[0]} and makes {_kind(module)[2]} images, but {like.path} takes "
            f"{_kind(like.module)[0]} and makes {_kind(like.module)[2]}: compare two runs of the same task"
        )
    return DemoModel(module, path, run_summary(module, path, module.checkpoint_step), validation_grid(path))


def serve(page, host: str, port: int, out: Path, on_stop) -> str:
    """Serve `page` until SIGINT or SIGTERM; then `on_stop()` (stops the running jobs) and close the
    server. Returns the signal's name."""
    stopping, received = threading.Event(), []

    def handle(signum, _frame):
        received.append(signal.Signals(signum).name)
        stopping.set()

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's check that its server is up, each request
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                    allowed_paths=[str(out)], ssr_mode=False)  # fmt: skip
    except OSError as err:
        raise ConfigError(
            f"port={port} on host={host}: cannot listen there ({err}); pick another, e.g. port={port + 1}"
        ) from None
    print(f"dlab-demo: serving on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    while not stopping.wait(0.2):  # a short wait, so the signal handler runs promptly
        pass
    on_stop()
    page.close()
    return received[0]


def run(cfg: DictConfig) -> None:
    port = checks.positive_int(cfg, "port", 7860)
    if port > 65535:
        raise ConfigError(f"port={port}: expected a port number from 1 to 65535, e.g. port=7860")
    if not isinstance(cfg.host, str) or not cfg.host:
        raise ConfigError(f"host={cfg.host!r}: expected a host name or address, e.g. host=127.0.0.1")
    max_images = checks.positive_int(cfg, "max_images", 16)
    device = pick_device(cfg.device)
    out = checks.writable_dir(cfg.paths.output_dir)
    if demo_page.gr is None:
        raise ConfigError("dlab-demo needs Gradio: pip install -e '.[demo]' (make install does)")

    first = load_model(cfg.ckpt_path, device, cfg.paths.train_runs)
    load = lambda spec: load_model(spec, device, cfg.paths.train_runs, like=first, key="compare")  # noqa: E731
    demo = demo_page.Demo(
        first, load, {name: instantiate(c) for name, c in cfg.samplers.items()}, out, max_images
    )
    if cfg.get("compare") is not None:
        demo.compare(str(cfg.compare))  # a mistake in compare= stops here, before the page is served
    name = serve(demo_page.build_page(demo, cfg.get("compare")), cfg.host, port, out, demo.stop_all)
    print(f"dlab-demo: stopped by {name}; the server is closed", flush=True)


@hydra_app("demo")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
