"""dlab-demo: the installed command in a real browser (Playwright driving Debian's
Chromium): one server per model kind for the session, a class model compared with the default model and a
sketch + caption model, both on free ports; the last test stops them with SIGTERM and SIGINT."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright

from diffusion_lab.demo_job import MAX_SCALE
from tests.conftest import BIN_DIR, untrained_run, user_env

# One worker: the servers are shared, and the last test ends them.
pytestmark = pytest.mark.xdist_group("demo")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make test` installs it); never a browser download


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
        n = len(npz["images"])  # the count typed into the just-opened "Sampling" can lag the click
        assert n >= 2 and npz["images"].shape == (n, 1, 28, 28)
        assert npz["guidance"].tolist() == [2.5] * n and npz["labels"].tolist() == [3] * n


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
    # Per image, whatever count the page sent (a number typed just as "Sampling" opens can lag a click).
    n = len(npz["images"])
    assert npz["guidance_sketch"].tolist() == [1.5] * n and npz["guidance_text"].tolist() == [3.0] * n
    assert npz["prompts"].tolist() == ["a thick seven"] * n
    assert npz["sketch"].shape == (n, 1, 28, 28) and npz["sketch"].sum() > 0  # the stroke, as read


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
