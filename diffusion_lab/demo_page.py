"""dlab-demo's page: the Gradio layout for a model's own conditions, and the handlers behind it.

Generate is a generator: it reads the page into a `demo_job.Job`, whose workers sample while the
handler yields each streamed x̂₀, then the final grid and its download. One job per browser session
(a second click while one runs gets a message), and Stop sets the job's flag, which the workers read at
every step. Every mistake a user can make is a `UserError`, shown in the status line, never a traceback.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusion_lab.demo_job import MAX_SCALE, Job, guidance_names, preview, read_ask
from diffusion_lab.errors import UserError
from diffusion_lab.inference import condition_preview, guidance_for

try:
    import gradio as gr
except ImportError:  # the [demo] extra is not installed: dlab-demo says how to install it (demo.run)
    gr = None

log = logging.getLogger("diffusion_lab")

PROGRESS = gr.Progress() if gr is not None else None  # Gradio finds a handler's progress bar by this default
BUSY = "A job is already running in this tab: wait for it to finish, or press Stop."
WARN = "⚠️ "  # starts every message about a mistake
PAD = 224  # the sketch pad's canvas, in pixels (shrunk to the model's size)


class Demo:
    """The models (the first, and compared ones loaded on demand), the running jobs by browser session,
    and the page's handlers."""

    def __init__(self, first, load: Callable, factories: dict, out: Path, max_images: int):
        self.first, self.load, self.factories, self.out, self.max_images = (
            first,
            load,
            factories,
            out,
            max_images,
        )
        self.loaded: dict[str, object] = {}  # compared models by the path typed
        self.jobs: dict[str, Job | None] = {}  # session -> its job (None while its inputs are read)
        self.lock, self.clicks = threading.Lock(), itertools.count(1)
        self.w: dict = {}  # the page's widgets by name (build_page)
        self.values: set = set()  # the widgets whose values a click reads (build_page)

    def compare(self, spec: str):
        """The model at `spec` (loaded once), checked to take what the first one takes."""
        with self.lock:
            if spec not in self.loaded:
                self.loaded[spec] = self.load(spec)
            return self.loaded[spec]

    def stop_all(self) -> None:
        with self.lock:
            for job in filter(None, self.jobs.values()):
                job.stop.set()

    def stop(self, request: gr.Request) -> str:
        with self.lock:
            job = self.jobs.get(request.session_hash)
        if job is None:
            return "Nothing is running."
        job.stop.set()
        return "Stopping at the next step…"

    def _values(self, values: dict) -> dict:
        """The page's values by name, as demo_job.read_ask reads them."""
        named = {name: values[self.w[name]] for name in self.w["inputs"] if name in self.w}
        named["scales"] = [values[s] for s in self.w["scales"]]
        named["uploads"] = {source: values[box] for source, box in self.w["uploads"].items()}
        return named

    def generate(self, values: dict, request: gr.Request, progress=PROGRESS):
        session, w = request.session_hash, self.w
        with self.lock:
            if session in self.jobs:
                yield {w["status"]: BUSY}
                return
            self.jobs[session] = None
        try:
            spec = (values[w["compare"]] or "").strip()
            models = [self.first, *([self.compare(spec)] if spec else [])]
            ask = read_ask(self.first.module, self._values(values), self.max_images)
            job = Job(models, ask, self.factories, self.out / f"click_{next(self.clicks):04d}")
            with self.lock:
                self.jobs[session] = job
            job.start()
            yield {w["read"]: self._read_picture(ask), w["status"]: "Sampling…"}
            yield from self._stream(job, progress)
        except UserError as err:
            yield {w["status"]: WARN + str(err)}
        except Exception as err:  # a bug: one line in the page, the traceback in the server's log
            log.exception("dlab-demo: the click failed")
            yield {w["status"]: f"{WARN}Internal error ({type(err).__name__}: {err}); see the server's log."}
        finally:
            with self.lock:
                job = self.jobs.pop(session, None)
            if job is not None:
                job.stop.set()  # the tab closed or the handler ended: its workers stop too

    def _read_picture(self, ask):
        """What the model reads of a spatial condition (the thinned sketch), or None."""
        module = self.first.module
        picture = condition_preview(module.encoder, ask.maps, module.net.in_channels) if ask.maps else None
        return None if picture is None else preview(picture)

    def _stream(self, job: Job, progress):
        """Yield each event of `job` to the page until every worker ended, then the closing status."""
        w, ended, notes, several = self.w, 0, {}, len(job.models) > 1
        while ended < len(job.models):
            kind, k, *rest = job.events.get()
            name = f"model {k + 1}" if several else "the model"
            if kind == "step":
                i, total, picture = rest
                if progress is not None:
                    progress((i, total), desc=f"{name}: step {i} of {total}")
                yield {w["results"][k]: picture, w["status"]: f"{name}: x̂₀ at step {i} of {total}…"}
            elif kind == "done":
                notes[k] = "done"
                yield {w["results"][k]: rest[0], w["downloads"][k]: [str(f) for f in rest[1]]}
            elif kind in ("stopped", "error"):
                notes[k] = f"Stopped at step {rest[0]} of {rest[1]}" if kind == "stopped" else WARN + rest[0]
            else:
                ended += 1
        if set(notes.values()) == {"done"}:
            yield {w["status"]: "Done: the samples are below each picture, to download."}
        else:
            yield {
                w["status"]: "; ".join(
                    f"model {k + 1}: {n}" if several else n for k, n in sorted(notes.items())
                )
            }

    def show_compare(self, spec: str):
        """The compare box: the second model's result and run panel, or why it cannot be loaded."""
        w, spec = self.w, (spec or "").strip()
        hidden = {column: gr.update(visible=False) for column in w["second"]}
        if not spec:
            return hidden | {w["status"]: "One model (no comparison)."}
        try:
            model = self.compare(spec)
        except UserError as err:
            return hidden | {w["status"]: WARN + str(err)}
        return {column: gr.update(visible=True) for column in w["second"]} | {
            w["run"][1]: model.summary,
            w["grid"][1]: model.grid,
            w["status"]: f"Comparing with {model.path}.",
        }


def _condition_inputs(module) -> dict:
    """The widgets for the model's own conditions: a digit picker, a prompt box with the run's grid
    prompts as examples, a sketch pad (with upload), or an upload per other spatial condition."""
    encoder, size, w = module.encoder, module.net.image_size, {}
    keys = encoder.input_key if isinstance(encoder.input_key, tuple) else (encoder.input_key,)
    if "label" in keys:
        classes = getattr(encoder, "num_classes", None) or encoder.sources["class"].num_classes
        w["digit"] = gr.Radio([str(c) for c in range(classes)], value="7", label="digit", elem_id="digit")
    if "caption" in keys:
        w["prompt"] = gr.Textbox(label="prompt", placeholder="a thick seven", elem_id="prompt")
        grid = ((module.run_config or {}).get("callbacks") or {}).get("sample_grid") or {}
        if grid.get("prompts"):
            gr.Examples([[p] for p in grid["prompts"]], inputs=[w["prompt"]], label="the run's grid prompts")
    if "sketch" in keys:
        brush = gr.Brush(colors=["#ffffff"], default_size=16, color_mode="fixed")
        black = np.zeros((PAD, PAD, 3), np.uint8)  # white strokes on black, as MNIST's digits
        w["pad"] = gr.Sketchpad(black, label="sketch: pick the brush and draw a digit, or upload one", brush=brush,
                                sources=("upload",), canvas_size=(PAD, PAD), type="numpy", elem_id="pad")  # fmt: skip
    others = [key for key in keys if key not in ("label", "caption", "sketch")]
    w["uploads"] = {
        k: gr.Image(type="filepath", sources=["upload"], label=f"{k} ({size}x{size})") for k in others
    }
    return w


def _sampling_inputs(module, names: list[str], factories: dict, max_images: int) -> dict:
    """A guidance slider per condition (the run's own scale first), the form, sampler, steps, seed, images."""
    own, w = guidance_for(module, None)[0][0], {}
    w["scales"] = [
        gr.Slider(
            0,
            MAX_SCALE,
            value=min(MAX_SCALE, own[name] if isinstance(own, dict) else own),
            step=0.1,
            label="guidance" + (f" ({name})" if len(names) > 1 else ""),
            elem_id=f"guidance-{name}",
        )  # fmt: skip
        for name in names
    ]
    w["form"] = gr.Radio(
        ["nested", "independent"], value="nested", label="guidance form", visible=len(names) > 1
    )
    with gr.Accordion("Sampling", open=False):
        own_sampler = f"the run's own ({type(module.sampler).__name__})"
        w["sampler"] = gr.Dropdown(
            [(own_sampler, "own"), *factories], value="own", label="sampler", elem_id="sampler"
        )
        w["steps"] = gr.Slider(
            1, module.schedule.num_timesteps, value=20, step=1, label="steps", elem_id="steps"
        )
        w["seed"] = gr.Number(0, precision=0, label="seed", elem_id="seed")
        w["n"] = gr.Slider(1, max_images, value=min(8, max_images), step=1, label="images", elem_id="n")
        w["interval"] = gr.Textbox(label="guidance interval σ_lo, σ_hi (empty: every step)", placeholder="0.3, 5",
                                   elem_id="interval")  # fmt: skip
    return w


def _results(w: dict, compare: str | None) -> None:
    """One picture (x̂₀ while sampling, then the samples) and download per model; what the model reads."""
    w["results"], w["downloads"], w["second"] = [], [], []
    with gr.Column(scale=2), gr.Row():
        for k in (1, 2):
            with gr.Column(visible=k == 1 or bool(compare)) as column:
                w["results"].append(gr.Image(label=f"model {k}: x̂₀, then the samples", type="numpy",
                                             interactive=False, elem_id=f"result-{k}"))  # fmt: skip
                w["downloads"].append(
                    gr.File(label="download", file_count="multiple", elem_id=f"download-{k}")
                )
            w["second"] += [column] if k == 2 else []
        w["read"] = gr.Image(
            label="what the model reads", interactive=False, visible="pad" in w, elem_id="read"
        )


def _run_panel(demo: Demo, compare: str | None) -> None:
    """What each run is (config, final metrics, validation grid), and the box that loads a second one."""
    w = demo.w
    with gr.Accordion("The run", open=True):
        with gr.Row():
            w["compare"] = gr.Textbox(
                compare or "", label="compare with (a run folder or .ckpt)", elem_id="compare"
            )
            w["load"] = gr.Button("Load", elem_id="load", scale=0)
        w["run"], w["grid"] = [], []
        with gr.Row():
            for k, model in enumerate([demo.first, demo.loaded.get(compare)]):
                with gr.Column(visible=k == 0 or model is not None) as column:
                    w["run"].append(gr.Markdown(model.summary if model else "", elem_id=f"run-{k + 1}"))
                    w["grid"].append(gr.Image(model.grid if model else None, label="validation grid",
                                              interactive=False, elem_id=f"grid-{k + 1}"))  # fmt: skip
                w["second"] += [column] if k == 1 else []


def build_page(demo: Demo, compare: str | None) -> gr.Blocks:
    """The page: inputs on the left, the results (one per model) on the right, the run panel below."""
    module, w = demo.first.module, demo.w
    names = guidance_names(module.encoder)
    with gr.Blocks(title="dlab-demo", analytics_enabled=False) as page:
        gr.Markdown(f"## dlab-demo · `{demo.first.path}`")
        with gr.Row():
            with gr.Column(scale=1):
                w |= _condition_inputs(module) | _sampling_inputs(
                    module, names, demo.factories, demo.max_images
                )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                w["status"] = gr.Markdown("Ready.", elem_id="status")
            _results(w, compare)
        _run_panel(demo, compare)
        w["inputs"] = ["digit", "prompt", "pad", "form", "sampler", "steps", "seed", "n", "interval"]
        demo.values = {w[k] for k in [*w["inputs"], "compare"] if k in w} | {
            *w["scales"],
            *w["uploads"].values(),
        }
        shown = {w["status"], w["read"], *w["results"], *w["downloads"]}
        generate.click(demo.generate, demo.values, shown, trigger_mode="multiple", concurrency_limit=None)
        stop.click(demo.stop, outputs=w["status"], concurrency_limit=None)
        changed = {*w["second"], w["run"][1], w["grid"][1], w["status"]}
        for event in (w["load"].click, w["compare"].submit):
            event(demo.show_compare, inputs=w["compare"], outputs=changed)
    return page
