"""dlab-demo: the page's inputs read in-process against hand-made answers (a pad's stroke, the scales, a
job's images and its Stop), then the installed command in a real browser (Playwright driving Debian's
Chromium): one server per model kind for the session, a class model compared with the default model and a
sketch + caption model, both on free ports; the last test stops them with SIGTERM and SIGINT."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image
from playwright.sync_api import sync_playwright

from diffusion_lab.demo import DemoModel
from diffusion_lab.demo_job import MAX_SCALE, Ask, Job, pad_map, read_interval, read_scales
from diffusion_lab.demo_page import BUSY, Demo, build_page
from diffusion_lab.errors import ConfigError, DataError
from diffusion_lab.inference import generate_batched, load_module, resolve_sampler
from diffusion_lab.utils import resolvers
from diffusion_lab.utils.instantiate import build_module
from tests.conftest import BIN_DIR, CONF_DIR, user_env

# One worker: the servers are shared, and the last test ends them.
pytestmark = pytest.mark.xdist_group("demo")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make test` installs it); never a browser download


def untrained_run(folder: Path, *overrides: str) -> Path:
    """A run folder holding an untrained checkpoint of the real config with `overrides` (no training: the
    page only needs the model's shape and kind), written the way dlab-train writes one."""
    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={folder}"])
    GlobalHydra.instance().clear()
    module = build_module(cfg)
    (folder / "checkpoints").mkdir(parents=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"run_config": run_config, "state_dict": module.state_dict(), "global_step": 0},
               folder / "checkpoints" / "last.ckpt")  # fmt: skip
    return folder


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


# ------------------------------------------------------------------------------------- in the browser


def start_demo(folder: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """The installed `dlab-demo args` on a free port, its output in folder/demo.out and demo.err."""
    folder.mkdir()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out, err = open(folder / "demo.out", "w"), open(folder / "demo.err", "w")
    proc = subprocess.Popen([str(BIN_DIR / "dlab-demo"), *args, f"port={port}", f"out={folder / 'out'}"],
                            cwd=folder, env=user_env(), stdout=out, stderr=err, text=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}/", folder


def wait_until_serving(proc: subprocess.Popen, url: str, folder: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder / "demo.err").read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"dlab-demo did not serve {url} in {timeout} s:\n{(folder / 'demo.err').read_text()[-3000:]}")


@pytest.fixture(scope="session")
def servers(request, tmp_path_factory):
    """{kind: (process, url, folder)}: a sketch + caption model (untrained, tiny), started while the tiny
    class run trains, then that run compared with the default model (untrained, `make train`'s size)."""
    root = tmp_path_factory.mktemp("demo")
    sketch = untrained_run(root / "sketch_text_run", "experiment=mnist_sketch_text", "debug=tiny")
    started = {"sketch": start_demo(root / "sketch", f"ckpt_path={sketch}")}
    default = untrained_run(root / "default_run")
    tiny_run = request.getfixturevalue("tiny_run")[1]  # trained meanwhile (or already, by other tests)
    started["class"] = start_demo(root / "class", f"ckpt_path={tiny_run}", f"compare={default}")
    for proc, url, folder in started.values():
        wait_until_serving(proc, url, folder)
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install -y "
                    "chromium; `make test` installs it when missing)", pytrace=False)  # fmt: skip
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


# Every text the status line shows, recorded in the page, so a test sees messages that came and went.
RECORD_STATUS = """() => { window.seen = []; const el = document.querySelector('#status');
  new MutationObserver(() => window.seen.push(el.innerText)).observe(el, {subtree: true, childList: true,
  characterData: true}); }"""


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a new tab on the page, recording its status line; closed after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})

    def open_(url: str):
        page = context.new_page()
        start = time.monotonic()
        page.goto(url)
        page.wait_for_selector("#generate")
        print(f"\npage load: {time.monotonic() - start:.2f} s")
        page.evaluate(RECORD_STATUS)
        return page

    yield open_
    context.close()


def wait_for_status(page, needle: str, timeout: float = 60) -> str:
    """The first recorded status holding `needle` (waits for it)."""
    page.wait_for_function("n => window.seen.some(t => t.includes(n))", arg=needle, timeout=timeout * 1000)
    return next(t for t in page.evaluate("window.seen") if needle in t)


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def shown_image(page, selector: str) -> np.ndarray:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("L"))


def offered_npz(page, selector: str) -> dict:
    href = page.locator(f'{selector} a[download="samples.npz"]').get_attribute("href")
    with np.load(io.BytesIO(page.request.get(href).body())) as data:
        return {key: data[key] for key in data.files}


def test_a_digit_streams_x0_then_both_compared_results_and_the_npz_records_the_scale(
    servers, open_page, tmp_path
):
    page = open_page(servers["class"][1])
    page.click("#digit >> text=3")
    set_number(page, "#guidance-label", 2.5)
    page.click("text=Sampling")
    set_number(page, "#n", 2)
    start = time.monotonic()
    page.click("#generate")
    wait_for_status(page, "model 2: x̂₀ at step")  # the default model (20 dpmpp steps) streams its x̂₀
    print(f"first intermediate image of the default model at 20 steps: {time.monotonic() - start:.2f} s")
    wait_for_status(page, "Done")
    seen = page.evaluate("window.seen")
    assert any("x̂₀ at step" in t for t in seen[: next(i for i, t in enumerate(seen) if "Done" in t)])
    page.screenshot(path=tmp_path / "demo.png", full_page=True)  # the README's picture
    print(f"screenshot: {tmp_path / 'demo.png'}")
    for k in (1, 2):  # two results for one click (compare=)
        assert shown_image(page, f"#result-{k}").std() > 10  # not blank: an untrained model's noise
        npz = offered_npz(page, f"#download-{k}")
        assert npz["images"].shape == (2, 1, 28, 28)
        assert npz["guidance"].tolist() == [2.5, 2.5] and npz["labels"].tolist() == [3, 3]


def test_stop_ends_a_long_run_and_a_second_click_meanwhile_is_refused(servers, open_page):
    page = open_page(servers["class"][1])
    page.click("text=Sampling")
    page.locator("#sampler input").click()
    page.get_by_role("option", name="ddpm", exact=True).click()
    set_number(page, "#steps", 1000)
    set_number(page, "#n", 1)
    page.click("#generate")
    wait_for_status(page, "x̂₀ at step")
    page.click("#generate")
    wait_for_status(page, "A job is already running in this tab")
    page.click("#stop")
    stopped = wait_for_status(page, "Stopped at step", timeout=30)
    steps = [int(part.split("Stopped at step ")[1].split(" ")[0]) for part in stopped.split(";")]
    assert all(step < 1000 for step in steps), stopped
    set_number(page, "#steps", 2)
    page.click("#generate")  # the stopped job has ended: this one runs
    wait_for_status(page, "Done")


def test_a_checkpoint_with_non_finite_weights_is_a_message_in_the_page(
    servers, open_page, tiny_run, tmp_path
):
    checkpoint = torch.load(next((tiny_run[1] / "checkpoints").glob("*.ckpt")), weights_only=False)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    page = open_page(servers["class"][1])
    page.fill("#compare textarea", str(tmp_path / "diverged.ckpt"))
    page.click("#load")
    message = wait_for_status(page, "non-finite weights")
    assert "⚠️ " in message and name in message and "Traceback" not in page.content()


def test_a_sketch_and_a_prompt_give_samples_whose_npz_records_both_scales(servers, open_page):
    """Each missing input is a message; a typed scale stays in the slider's range; then a stroke and a prompt."""
    page = open_page(servers["sketch"][1])
    page.click("#generate")
    wait_for_status(page, "The prompt is empty")
    page.fill("#prompt textarea", "a thick seven")
    page.click("#generate")
    wait_for_status(page, "The sketch is blank")
    page.click("text=Sampling")
    set_number(page, "#n", 2)
    set_number(page, "#guidance-text", MAX_SCALE + 2)  # kept in range (the handler's own check: in-process)
    assert float(page.locator("#guidance-text input[type=number]").input_value()) == MAX_SCALE
    set_number(page, "#guidance-sketch", 1.5)
    set_number(page, "#guidance-text", 3)
    page.click("#pad button[aria-label=Brush]")
    canvas = page.locator("#pad canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, top, height = box["x"] + box["width"] / 2, box["y"], box["height"]
    page.mouse.move(x, top + height * 0.2)
    page.mouse.down()
    page.mouse.move(x, top + height * 0.8, steps=8)  # a vertical stroke: a 1
    page.mouse.up()
    page.click("#generate")
    wait_for_status(page, "Done")
    assert shown_image(page, "#result-1").std() > 10
    npz = offered_npz(page, "#download-1")
    assert npz["guidance_sketch"].tolist() == [1.5] * 2 and npz["guidance_text"].tolist() == [3.0] * 2
    assert npz["prompts"].tolist() == ["a thick seven"] * 2
    assert npz["sketch"].shape == (2, 1, 28, 28) and npz["sketch"].sum() > 0  # the stroke, as read


def test_the_server_exits_cleanly_on_sigterm_and_sigint(servers):
    """The last test: it ends the session's servers."""
    for kind, signum in (("class", signal.SIGTERM), ("sketch", signal.SIGINT)):
        proc, url, folder = servers[kind]
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0, (folder / "demo.err").read_text()[-3000:]
        said = (folder / "demo.out").read_text()
        assert f"stopped by {signal.Signals(signum).name}; the server is closed" in said
        assert "Traceback" not in (folder / "demo.err").read_text()
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
