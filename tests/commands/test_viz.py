"""`dlab-viz`: the schedule, forward-process and trajectory pictures, through the installed command."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from diffusion_lab import viz
from diffusion_lab.data.mnist import load_split
from diffusion_lab.utils.images import to_model_range
from tests.conftest import DATA_DIR, run_cli


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
    result = run_cli("dlab-viz", "plot=schedules", f"out={tmp_path / 'viz'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "viz" / "schedules.png"
    assert f"wrote {path}" in result.stdout
    assert _png_size(path) == tuple(round(v * viz.DPI) for v in viz.SCHEDULES_FIGSIZE)


def test_forward_png(tmp_path):
    result = run_cli("dlab-viz", "plot=forward", "index=3", f"out={tmp_path / 'viz'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _png_size(tmp_path / "viz" / "forward.png") == tuple(
        round(v * viz.DPI) for v in viz.FORWARD_FIGSIZE
    )


def test_forward_tiles_go_from_the_digit_to_noise():
    schedules = viz.load_schedules(num_timesteps=1000)
    timesteps = viz.column_timesteps(1000)
    assert timesteps[0] == 0 and timesteps[1] == 100 and timesteps[-1] == 999 and len(timesteps) == 11
    image = to_model_range(load_split(DATA_DIR, train=False)[0][0])  # (1, 28, 28) in [-1, 1], a real "7"
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


def test_unknown_plot_is_one_line_naming_the_choices(tmp_path):
    result = run_cli("dlab-viz", "plot=nope", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = "plot='nope': expected one of schedules, forward, trajectory, e.g. plot=schedules"
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]
    (run_dir,) = (tmp_path / "outputs" / "viz" / "runs").iterdir()  # the default out: a new run folder
    assert (run_dir / "error.txt").read_text().strip() == expected


def test_index_out_of_range_is_one_line(tmp_path):
    result = run_cli("dlab-viz", "plot=forward", "index=10000", f"out={tmp_path / 'viz'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: index=10000: expected a test-split digit 0..9999, e.g. index=0"
    ]


def test_trajectory_gif_and_strip(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    out = tmp_path / "viz"
    result = run_cli(
        "dlab-viz", "plot=trajectory", f"ckpt_path={run_dir}", "steps=4", "columns=8", f"out={out}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trajectory of {run_dir / 'checkpoints'}/" in result.stdout
    assert "last.ckpt at guidance 1.6 (the run's own)" in result.stdout  # no guidance=: the recipe's
    assert (
        f"wrote {out / 'trajectory.gif'}" in result.stdout
        and f"wrote {out / 'trajectory.png'}" in result.stdout
    )
    with Image.open(out / "trajectory.gif") as gif:
        assert gif.n_frames == 4  # one per sampling step
        gif.seek(3)
        assert gif.info["duration"] == 2000  # the final samples are held
        # 10 classes of 28 px plus 2 px padding, 2 rows (x_t, x̂₀), upscaled 3x
        assert gif.size == (3 * (10 * 30 + 2), 3 * (2 * 30 + 2))
    with Image.open(out / "trajectory.png") as strip:
        assert strip.size == (2 * 4 * 30 + 2, 10 * 30 + 2 + 30)  # columns=8 > 4 steps: every step shown


def test_trajectory_without_a_checkpoint_is_clear(tmp_path):
    result = run_cli("dlab-viz", "plot=trajectory", "ckpt_path=last", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ckpt_path=last" in result.stderr and str(tmp_path / "outputs" / "train" / "runs") in result.stderr
