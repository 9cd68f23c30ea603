"""The work behind dlab-demo's Generate button: the page's values read into a model's inputs, with one
clear message for each mistake, and a sampling job whose workers stream x̂₀ every few steps and stop at
the next step when asked.

Sampling is `DiffusionModule.generate` seeded as `inference.generate_batched` seeds its first batch, so
the page shows the images `dlab-sample` gives for the same inputs and seed, and the download is written
by dlab-sample's own `write_samples`.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from diffusion_lab.data import spatial
from diffusion_lab.data.condition_files import read_condition
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.inference import batch_seed, conditions, resolve_sampler, spatial_encoders
from diffusion_lab.sample import write_samples
from diffusion_lab.utils import checks
from diffusion_lab.utils.images import to_model_range, to_uint8

MAX_SCALE = 10.0  # the guidance sliders' range is 0 to this
PREVIEWS = 10  # x̂₀ is shown about this many times a run (every few steps), and at the first step
ZOOM = 4  # pixels per image pixel in the page's pictures, so a 28x28 digit is readable


@dataclass
class Ask:
    """One click's request, checked: the conditions as `inference.conditions` takes them, and how to sample."""

    labels: list[int] | None
    prompts: list[str] | None
    maps: dict[str, torch.Tensor]
    scale: float | dict[str, float]
    interval: tuple[float, float] | None
    form: str
    sampler: str  # "own" (the run's) or a conf/sampler name
    steps: int
    seed: int
    n: int


def guidance_names(encoder) -> list[str]:
    """The conditions a slider each guides: a combined model's sources, else one (the model's input)."""
    return list(encoder.sources) if hasattr(encoder, "sources") else [encoder.input_key]


def pad_map(value, size: int) -> torch.Tensor:
    """The sketch (1, 1, size, size) in {0, 1} of the pad: the strokes drawn (any colour) over the
    uploaded picture, shrunk to the model's size and thinned by `spatial.sketch` as training's sketches
    were. A light upload is read as dark strokes on paper and turned into MNIST's white on black."""
    value = value or {}
    layers = [np.asarray(layer, np.float32) / 255 for layer in value.get("layers") or []]
    ink = max((layer[..., 3] for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4), default=None)
    background = value.get("background")
    if background is not None:
        picture = np.asarray(Image.fromarray(np.asarray(background)).convert("LA"), np.float32) / 255
        grey = picture[..., 0] * picture[..., 1]  # transparent is black
        grey = 1 - grey if picture[..., 1].mean() > 0.5 and grey.mean() > 0.5 else grey
        ink = grey if ink is None else np.maximum(ink, grey)
    if ink is None or ink.max() <= 0:
        raise DataError("The sketch is blank: draw a digit on the pad (or upload a sketch), then Generate.")
    small = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((size, size), Image.BOX))
    small = (
        torch.from_numpy(small / max(1, small.max()) * 255).round().to(torch.uint8)
    )  # the darkest stroke white
    return spatial.sketch(to_model_range(small[None, None]))


def page_maps(encoder, pad, uploads: dict[str, str | None], size: int, channels: int) -> dict:
    """{source: map} of a spatial model: the sketch from the pad, other sources from their uploaded file
    read as dlab-sample reads `lowres=` or `semantic=` (at the model's size)."""
    maps = {}
    for part in spatial_encoders(encoder):
        source = part.input_key
        if source == "sketch":
            maps[source] = pad_map(pad, size)
        elif uploads.get(source) is None:
            raise DataError(f"No {source} image: upload one ({size}x{size} for this model), then Generate.")
        else:
            maps[source] = read_condition(source, uploads[source], size, channels, part.transform)
    return maps


def read_scales(names: list[str], values: list) -> float | dict[str, float]:
    """One slider's scale, or {name: scale} for a model with several conditions; each from 0 to MAX_SCALE."""
    for name, s in zip(names, values, strict=True):
        if not checks.is_number(s) or not 0 <= s <= MAX_SCALE:
            raise ConfigError(
                f"Guidance ({name}) = {s}: out of range; use a scale from 0 (unconditional) to {MAX_SCALE:g}."
            )
    return float(values[0]) if len(names) == 1 else {n: float(s) for n, s in zip(names, values, strict=True)}


def read_interval(text: str | None) -> tuple[float, float] | None:
    """The guidance interval box: empty (guide every step) or `σ_lo, σ_hi`, e.g. `0.3, 5` or `2, inf`."""
    if not (text or "").strip():
        return None
    try:
        bounds = [float(b) for b in text.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        bounds = text
    return checks.guidance_interval(OmegaConf.create({"guidance_interval": bounds}))


def read_numbers(steps, seed, n, max_images: int) -> tuple[int, int, int]:
    """Steps, seed and number of images as whole numbers (the page's number boxes give floats)."""
    whole = {k: int(v) if checks.is_number(v) and float(v).is_integer() else v for k, v in
             {"steps": steps, "seed": seed, "images": n}.items()}  # fmt: skip
    cfg = OmegaConf.create(whole)
    numbers = checks.positive_int(cfg, "steps", 20), checks.non_negative_int(cfg, "seed", 0)
    images = checks.positive_int(cfg, "images", 8)
    if images > max_images:
        raise ConfigError(f"images={images}: the page makes at most {max_images}; use dlab-sample for more.")
    return (*numbers, images)


def read_ask(module, values: dict, max_images: int) -> Ask:
    """The page's values by name (`digit`, `prompt`, `pad`, `uploads`, `scales`, `interval`, `form`,
    `sampler`, `steps`, `seed`, `n`) as a checked `Ask` for `module`; a UserError names the first mistake.
    Every condition the page shows is needed (a model with several conditions gets each of them)."""
    prompt = (values.get("prompt") or "").strip()
    if "prompt" in values and not prompt:
        raise ConfigError("The prompt is empty: type what to draw, e.g. “a thick seven”, or pick an example.")
    size, channels = module.net.image_size, module.net.in_channels
    maps = page_maps(module.encoder, values.get("pad"), values.get("uploads") or {}, size, channels)
    steps, seed, n = read_numbers(values["steps"], values["seed"], values["n"], max_images)
    return Ask(
        labels=[int(values["digit"])] if "digit" in values else None,
        prompts=[prompt] if "prompt" in values else None,
        maps=maps,
        scale=read_scales(guidance_names(module.encoder), values["scales"]),
        interval=read_interval(values.get("interval")),
        form=values.get("form") or "nested",
        sampler=values.get("sampler") or "own",
        steps=steps,
        seed=seed,
        n=n,
    )


def preview(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] or uint8 → one picture (H', W', 3) uint8: a near-square grid, ZOOM times."""
    grid = make_grid(to_uint8(images.detach().cpu()), nrow=math.ceil(math.sqrt(len(images))), padding=1)
    return grid.permute(1, 2, 0).repeat_interleave(ZOOM, 0).repeat_interleave(ZOOM, 1).numpy()


class Stopped(Exception):
    """Raised in `on_step` when Stop is pressed: `sampling.sample` ends there."""


@dataclass
class Job:
    """One click: each model samples the same inputs and seed in a worker thread; `events` carries
    ("step", k, i, total, picture), ("done", k, picture, [npz, png]), ("stopped", k, i, total) or
    ("error", k, message), and one ("end", k, None) per model."""

    models: list  # demo.DemoModel
    ask: Ask
    factories: dict  # conf/sampler name -> partial
    out: Path
    stop: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self):
        # Every input is checked on every model before any work starts, so a mistake is one message.
        self.plans = [self._plan(model) for model in self.models]

    def _plan(self, model):
        module = model.module
        inputs, key = conditions(module.encoder, self.ask.labels, self.ask.prompts, self.ask.n,
                                 checkpoint=model.path, maps=self.ask.maps)  # fmt: skip
        factory = self.factories.get(self.ask.sampler)  # None: the run's own
        return inputs, key, resolve_sampler(module, factory, self.ask.steps)

    def start(self) -> list[threading.Thread]:
        workers = [
            threading.Thread(target=self._work, args=(k,), daemon=True) for k in range(len(self.models))
        ]
        for worker in workers:
            worker.start()
        return workers

    def _work(self, k: int) -> None:
        try:
            self._sample(k)
        except Stopped as stop:
            self.events.put(("stopped", k, *stop.args))
        except Exception as err:  # shown in the page; the server goes on
            self.events.put(("error", k, f"{type(err).__name__}: {err}"))
        finally:
            self.events.put(("end", k, None))

    def _sample(self, k: int) -> None:
        (module, ask), (inputs, key, sampler) = (self.models[k].module, self.ask), self.plans[k]
        total = len(sampler.timesteps)
        every = max(1, total // PREVIEWS)

        def on_step(i: int, x0: torch.Tensor) -> None:
            if self.stop.is_set():
                raise Stopped(i + 1, total)
            if i % every == 0 and i + 1 < total:
                self.events.put(("step", k, i + 1, total, preview(x0)))

        generator = torch.Generator().manual_seed(batch_seed(ask.seed, 0))  # generate_batched's first batch
        images = module.generate(inputs, guidance_scale=ask.scale, sampler=sampler, generator=generator,
                                 guidance_interval=ask.interval, guidance_form=ask.form, on_step=on_step)  # fmt: skip
        images = to_uint8(images).cpu()
        folder = checks.writable_dir(self.out / f"model_{k + 1}")
        write_samples(folder, module.encoder, images, inputs, key, [ask.scale], ask.interval, ask.form)
        self.events.put(("done", k, preview(images), [folder / "samples.npz", folder / "samples.png"]))
