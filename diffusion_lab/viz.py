"""`dlab-viz`: pictures of the diffusion process.

    dlab-viz plot=schedules               # ᾱ_t and log-SNR vs t for every conf/schedule/*.yaml
    dlab-viz plot=forward index=0         # one real test digit noised at t = 0, T/10, …, T, one row per schedule
    dlab-viz plot=trajectory ckpt_path=last steps=20 columns=8   # reverse process: GIF + PNG strip
                                           # at the run's own guidance (or guidance=2)

Other keys: `timesteps=1000` (T of the schedule plots), `seed=0`, `out=<folder>` (default a run folder
outputs/viz/runs/<time>_<pid>), `paths.data_dir=<MNIST root>` (see conf/viz.yaml).
Schedules come from the real configs (conf/schedule/), so a new schedule file shows up here without code.
Each plot is one entry of `COMMANDS` (name -> function(cfg)), so more can be added beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from diffusion_lab import CONFIG_DIR
from diffusion_lab.cli import hydra_app
from diffusion_lab.condition import count
from diffusion_lab.data.mnist import load_split
from diffusion_lab.diffusion.schedules import BETA_SCHEDULES
from diffusion_lab.errors import ConfigError
from diffusion_lab.inference import (
    condition_preview,
    conditions,
    guidance_for,
    load_module,
    resolve_sampler,
    scale_words,
)
from diffusion_lab.sample import read_maps
from diffusion_lab.utils import checks
from diffusion_lab.utils.images import to_model_range, to_uint8, to_unit
from diffusion_lab.utils.plots import plt

CONF_DIR = Path(CONFIG_DIR)
DPI = 100
# Figures are saved without bbox="tight" so the PNG size is exactly figsize · DPI pixels.
SCHEDULES_FIGSIZE = (12.0, 4.5)
FORWARD_FIGSIZE = (11.0, 5.5)
NUM_COLUMNS = 11  # t = 0, T/10, …, T


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_schedules(num_timesteps: int = 1000) -> dict:
    """{config name: NoiseSchedule} for every discrete conf/schedule/*.yaml (those with T timesteps; EDM's
    continuous σ has no t axis to draw on), composed and instantiated by Hydra."""
    # Composing needs a fresh GlobalHydra; inside `dlab-viz` nothing of Hydra's reads it after the task.
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        names = [p.stem for p in (CONF_DIR / "schedule").glob("*.yaml")]
        cfgs = {name: compose(config_name=f"schedule/{name}").schedule for name in names}
    GlobalHydra.instance().clear()
    schedules = {
        name: instantiate(cfg, num_timesteps=num_timesteps)
        for name, cfg in cfgs.items()
        if "num_timesteps" in cfg
    }
    kinds = list(BETA_SCHEDULES)  # plain curves first, in the library's order, then their rescaled variants

    def order(name):
        s = schedules[name]
        return (s.zero_terminal_snr, kinds.index(s.kind) if s.kind in kinds else len(kinds), name)

    return {name: schedules[name] for name in sorted(schedules, key=order)}


def column_timesteps(num_timesteps: int, columns: int = NUM_COLUMNS) -> list[int]:
    """t = 0, T/10, …, T as 0-indexed steps (the last one is T − 1, the final noising step)."""
    return [min(round(i * num_timesteps / (columns - 1)), num_timesteps - 1) for i in range(columns)]


def forward_tiles(image: torch.Tensor, schedules: dict, timesteps: list[int], seed: int = 0) -> torch.Tensor:
    """x_t of one image (1, 28, 28) in [-1, 1] for each schedule × t: (S, len(t), 1, 28, 28).

    The same noise is used everywhere, so rows differ only by the schedule."""
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps)
    x0, eps = image.expand(len(t), *image.shape), noise.expand(len(t), *image.shape)
    return torch.stack([s.add_noise(x0, eps, t) for s in schedules.values()])


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def plot_schedules(cfg: DictConfig) -> Path:
    schedules = load_schedules(checks.positive_int(cfg, "timesteps", 1000))
    fig, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=SCHEDULES_FIGSIZE, dpi=DPI)
    for name, s in schedules.items():
        t = torch.arange(s.num_timesteps)
        log_snr = s.log_snr.double().masked_fill(~torch.isfinite(s.log_snr), float("nan"))  # −inf at SNR 0
        style = "--" if s.zero_terminal_snr else "-"  # rescaled variants sit on top of their base curve
        ax_ab.plot(t.numpy(), s.alphas_cumprod.numpy(), style, label=name)
        ax_snr.plot(t.numpy(), log_snr.numpy(), style, label=name)
    ax_ab.set(title=r"$\bar\alpha_t$ (signal kept)", xlabel="t", ylabel=r"$\bar\alpha_t$")
    ax_snr.set(title=r"log-SNR $= \log \bar\alpha_t / (1-\bar\alpha_t)$", xlabel="t", ylabel="log-SNR")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, cfg.paths.output_dir, "schedules.png")


def plot_forward(cfg: DictConfig) -> Path:
    num_timesteps = checks.positive_int(cfg, "timesteps", 1000)
    images, labels = load_split(cfg.paths.data_dir, train=False)
    index = cfg.index
    if not (checks.is_int(index) and 0 <= index < len(images)):
        raise ConfigError(f"index={index!r}: expected a test-split digit 0..{len(images) - 1}, e.g. index=0")
    image = to_model_range(images[index])  # (1, 28, 28) in [-1, 1]
    schedules = load_schedules(num_timesteps)
    timesteps = column_timesteps(num_timesteps)
    tiles = forward_tiles(image, schedules, timesteps, cfg.seed)  # (S, C, 1, 28, 28)
    pad = 2
    grid = make_grid(to_unit(tiles.flatten(0, 1)), nrow=len(timesteps), padding=pad, pad_value=1)
    fig, ax = plt.subplots(figsize=FORWARD_FIGSIZE, dpi=DPI)
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    centre = [pad + i * (28 + pad) + 14 for i in range(max(len(timesteps), len(schedules)))]
    ax.set_xticks(centre[: len(timesteps)], [str(t) for t in timesteps])
    ax.set_yticks(centre[: len(schedules)], list(schedules))
    ax.set(xlabel="t", title=f"forward process q(x_t | x_0) of test digit #{index} (label {labels[index]})")
    fig.tight_layout()
    return _save(fig, cfg.paths.output_dir, "forward.png")


def _save(fig, out: str | Path, name: str) -> Path:
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path}")
    return path


@torch.no_grad()
def plot_trajectory(cfg: DictConfig) -> Path:
    """One sample per class (prompt, or spatial condition) through the reverse process: `trajectory.gif`
    (x_t above x̂₀ at every step) and `trajectory.png` (rows = classes; x_t at `columns` steps, then x̂₀
    at the same steps). A spatial condition is shown with its sample: above it in the GIF, first in the PNG."""
    # Every argument is checked before the model is loaded.
    asked = checks.optional_guidance_scales(cfg)
    if asked is not None and len(asked) != 1:
        raise ConfigError(f"guidance={cfg.guidance!r}: the trajectory takes one scale, e.g. guidance=2")
    steps = checks.optional_positive_int(cfg, "steps", 20)
    columns = checks.positive_int(cfg, "columns", 8)
    seed = checks.non_negative_int(cfg, "seed", 0)
    labels, prompts = checks.class_labels(cfg), checks.prompts(cfg)
    out = checks.writable_dir(cfg.paths.output_dir)

    module, path = load_module(cfg.ckpt_path, "cpu", cfg.paths.train_runs)
    (guidance, *more), guidance_words = guidance_for(module, asked)
    if more:
        raise ConfigError(f"{path}: the run names the scales {[guidance, *more]}; give one, e.g. guidance=2")
    print(f"trajectory of {path} at {guidance_words}")
    sampler = resolve_sampler(module, None, steps)  # the run's own sampler
    # one row per class, or per prompt of a caption model
    maps, _ = read_maps(cfg, module)  # sketch=... or conditions_from=... for a spatial model
    inputs, _ = conditions(module.encoder, labels, prompts, checkpoint=path, maps=maps)
    n = count(inputs)
    generator = torch.Generator().manual_seed(seed)
    _, intermediates = module.generate(inputs, guidance, sampler, generator, return_intermediates=True)
    # A spatial condition is shown above its column in the GIF and first in its row in the PNG.
    picture = condition_preview(module.encoder, inputs, module.net.in_channels)
    x_t, x0 = (
        torch.stack(intermediates["x_t"], 1),
        torch.stack(intermediates["x0"], 1),
    )  # (classes, steps, C, H, W)

    frames = []
    for k in range(x_t.shape[1]):
        both = torch.cat([x_t[:, k], x0[:, k]])  # row 1: x_t, row 2: x̂₀ (a condition row above them)
        both = both if picture is None else torch.cat([picture, both])
        grid = to_uint8(make_grid(both.clamp(-1, 1), nrow=n, padding=2, pad_value=1.0))  # white pad
        frame = Image.fromarray(grid.permute(1, 2, 0).numpy())
        frames.append(frame.resize((frame.width * 3, frame.height * 3), Image.NEAREST))
    gif = out / "trajectory.gif"
    durations = [80] * (len(frames) - 1) + [2000]  # ms; hold the final samples
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=durations, loop=0)

    picks = torch.linspace(0, x_t.shape[1] - 1, min(columns, x_t.shape[1])).round().long()
    strip = torch.cat([x_t[:, picks], x0[:, picks]], dim=1)  # (classes, 2 * columns, C, H, W)
    strip = strip if picture is None else torch.cat([picture[:, None], strip], dim=1)
    grid = make_grid(to_unit(strip.flatten(0, 1)), nrow=strip.shape[1], padding=2, pad_value=1.0)
    fig = plt.figure(figsize=(grid.shape[2] / DPI, grid.shape[1] / DPI + 0.3))
    ax = fig.add_axes((0, 0, 1, grid.shape[1] / (grid.shape[1] + 0.3 * DPI)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    timesteps = ", ".join(f"{sampler.timesteps[i].item():.3g}" for i in picks)  # EDM's are σ, floats
    shown = "" if picture is None else "the condition, then "
    fig.suptitle(f"{shown}x_t and x̂₀ at t = [{timesteps}], guidance {scale_words(guidance)}", fontsize=8)
    print(f"wrote {gif}")
    return _save(fig, out, "trajectory.png")


COMMANDS: dict[str, Callable[[DictConfig], Path]] = {
    "schedules": plot_schedules,
    "forward": plot_forward,
    "trajectory": plot_trajectory,
}


def run(cfg: DictConfig) -> Path:
    """Draw `cfg.plot` into the run folder; returns the PNG it wrote."""
    if cfg.plot not in COMMANDS:
        given = "plot is required" if cfg.plot is None else f"plot={cfg.plot!r}"
        raise ConfigError(f"{given}: expected one of {', '.join(COMMANDS)}, e.g. plot=schedules")
    return COMMANDS[cfg.plot](cfg)


@hydra_app("viz")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
