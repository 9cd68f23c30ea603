"""dlab-demo's page inputs and jobs in-process, against hand-made answers: a pad's stroke, the scales, a job's
images and its Stop, the click handler's messages (the browser tests are in test_demo.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_lab.demo import DemoModel
from diffusion_lab.demo_job import MAX_SCALE, Ask, Job, pad_map, read_interval, read_scales
from diffusion_lab.demo_page import BUSY, Demo, build_page
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.inference import generate_batched, load_module, resolve_sampler
from tests.conftest import untrained_run

# ------------------------------------------------------------------------------------- in-process


def test_a_stroke_on_the_pad_becomes_the_thinned_sketch_the_model_reads():
    layer = np.zeros((224, 224, 4), np.uint8)
    layer[40:180, 104:120, 3] = 255  # a bar: rows 5..22 (22 half-covered) and columns 13..14 of 28 (224 / 8)
    sketch = pad_map({"background": np.zeros((224, 224, 3), np.uint8), "layers": [layer]}, 28)
    # Zhang-Suen thins the 2-px bar to its west column, one pixel shorter at each end.
    assert sketch.shape == (1, 1, 28, 28)
    assert sketch[0, 0].nonzero().tolist() == [[r, 13] for r in range(6, 22)]
    paper = np.full((224, 224, 3), 255, np.uint8)
    paper[40:180, 104:120] = 0  # the same bar drawn dark on a light upload: read as white on black
    assert torch.equal(pad_map({"background": paper, "layers": []}, 28), sketch)
    with pytest.raises(DataError, match="The sketch is blank: draw a digit on the pad"):
        pad_map({"background": np.zeros((224, 224, 3), np.uint8), "layers": []}, 28)


def test_scales_out_of_range_or_not_finite_are_messages():
    assert read_scales(["label"], [2.5]) == 2.5
    assert read_scales(["sketch", "text"], [1.5, 3]) == {"sketch": 1.5, "text": 3.0}
    for bad in (MAX_SCALE + 0.5, -1, float("nan")):
        message = rf"Guidance \(text\) = {bad}: out of range; use a scale from 0"
        with pytest.raises(ConfigError, match=message):
            read_scales(["sketch", "text"], [1, bad])
    assert read_interval("") is None and read_interval("0.3, 5") == (0.3, 5.0)
    with pytest.raises(ConfigError, match="guidance_interval="):
        read_interval("5, 1")


@pytest.fixture(scope="module")
def tiny_class_model(tmp_path_factory):
    module, path = load_module(untrained_run(tmp_path_factory.mktemp("tiny_class"), "debug=tiny"))
    return DemoModel(module, path, "", None)


ASK = Ask(labels=[3], prompts=None, maps={}, scale=2.0, interval=None, form="nested", sampler="own", steps=3,
          seed=5, n=2)  # fmt: skip


def drain(job: Job) -> list:
    events, ended = [], 0
    while ended < len(job.models):
        events.append(job.events.get(timeout=60))
        ended += events[-1][0] == "end"
    return events


def test_a_job_gives_dlab_samples_images_for_its_seed_and_writes_its_npz(tiny_class_model, tmp_path):
    job = Job([tiny_class_model], ASK, {}, tmp_path)
    job.start()
    events = drain(job)
    assert [e[0] for e in events] == ["step", "step", "done", "end"]  # x̂₀ after steps 1 and 2 of 3
    module = tiny_class_model.module
    expected = generate_batched(module, torch.tensor([3, 3]), 2.0, resolve_sampler(module, None, 3), 250, 5,
                                progress=False)  # fmt: skip
    with np.load(tmp_path / "model_1" / "samples.npz") as data:
        assert np.array_equal(data["images"], expected.numpy())
        assert data["guidance"].tolist() == [2.0, 2.0] and data["labels"].tolist() == [3, 3]


def test_a_stopped_job_ends_at_the_next_step(tiny_class_model, tmp_path):
    job = Job([tiny_class_model], replace(ASK, steps=50), {}, tmp_path)
    job.stop.set()
    job.start()
    assert [e[:4] for e in drain(job)] == [("stopped", 0, 1, 50), ("end", 0, None)]
    assert not (tmp_path / "model_1").exists()


def test_the_click_handler_answers_a_mistake_and_a_second_click_with_a_message(tiny_class_model, tmp_path):
    """What the page's status line gets (the API can send a scale the slider would not)."""
    demo = Demo(tiny_class_model, None, {}, tmp_path, max_images=16)
    build_page(demo, None)
    values = {widget: widget.value for widget in demo.values}
    status = demo.w["status"]
    tab = SimpleNamespace(session_hash="tab")
    (answer,) = demo.generate(values | {demo.w["scales"][0]: MAX_SCALE + 2}, tab)
    message = "⚠️ Guidance (label) = 12.0: out of range; use a scale from 0 (unconditional) to 10."
    assert answer == {status: message}
    demo.jobs["tab"] = None  # a job of this tab is being read
    assert list(demo.generate(values, tab)) == [{status: BUSY}]
