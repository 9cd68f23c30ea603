"""`dlab-viz`: the schedule and forward-process pictures, drawn from the real schedule configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_lab import viz
from diffusion_lab.data.mnist import load_split

DATA_DIR = os.environ.get(
    "DLAB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
)


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 10_000, path  # a real picture, not an empty canvas
    with Image.open(path) as image:
        return image.size


def test_every_schedule_config_is_drawn():
    schedules = viz.load_schedules(num_timesteps=100)
    assert {"linear", "scaled_linear", "cosine", "sigmoid", "zero_terminal_snr"} <= set(schedules)
    assert all(s.num_timesteps == 100 for s in schedules.values())
    assert schedules["zero_terminal_snr"].zero_terminal_snr


def test_schedules_png(tmp_path):
    path = viz.draw(["schedules", "--out", str(tmp_path)])
    assert path == tmp_path / "schedules.png"
    assert _png_size(path) == tuple(round(v * viz.DPI) for v in viz.SCHEDULES_FIGSIZE)


def test_forward_png(tmp_path):
    path = viz.draw(["forward", "--out", str(tmp_path), "--data-dir", DATA_DIR, "--index", "3"])
    assert _png_size(path) == tuple(round(v * viz.DPI) for v in viz.FORWARD_FIGSIZE)


def test_forward_tiles_go_from_the_digit_to_noise():
    schedules = viz.load_schedules(num_timesteps=1000)
    timesteps = viz.column_timesteps(1000)
    assert timesteps[0] == 0 and timesteps[1] == 100 and timesteps[-1] == 999 and len(timesteps) == 11
    image = load_split(DATA_DIR, train=False)[0][0].float() / 127.5 - 1  # (1, 28, 28), a real "7"
    tiles = viz.forward_tiles(image, schedules, timesteps, seed=0)  # (S, 11, 1, 28, 28)
    assert tiles.shape == (len(schedules), 11, 1, 28, 28)
    # t = 0 keeps the digit (up to β_0-sized noise: √(1 − ᾱ_0) ≤ 0.03), and the signal fades with t
    assert torch.allclose(tiles[:, 0], image.expand_as(tiles[:, 0]), atol=0.15)
    corr = torch.stack(
        [torch.corrcoef(torch.stack([row.flatten(), image.flatten()]))[0, 1] for row in tiles.flatten(0, 1)]
    )
    corr = corr.view(len(schedules), 11)
    assert (corr[:, 0] > 0.99).all() and (corr[:, -1].abs() < 0.25).all()
    # zero terminal SNR: the last column is exactly the (shared) noise
    ztsnr = list(schedules).index("zero_terminal_snr")
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tiles[ztsnr, -1], noise, atol=1e-5)


def test_unknown_subcommand_is_rejected(capsys):
    with pytest.raises(SystemExit):
        viz.main(["nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_exits_zero(tmp_path):
    """The installed `dlab-viz` (console scripts pass main()'s return value to sys.exit)."""
    script = Path(sys.executable).with_name("dlab-viz")
    if not script.is_file():
        pytest.fail(f"dlab-viz is not installed next to {sys.executable}; run `pip install -e .`")
    proc = subprocess.run(
        [script, "schedules", "--out", tmp_path], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "schedules.png").is_file() and "wrote" in proc.stdout
