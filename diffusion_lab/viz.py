"""`dlab-viz`: pictures of the diffusion process.

    dlab-viz schedules --out outputs/viz   # ᾱ_t and log-SNR vs t for every conf/schedule/*.yaml
    dlab-viz forward --out outputs/viz     # one real digit noised at t = 0, T/10, …, T, one row per schedule
    dlab-viz trajectory --ckpt last        # the reverse process of a trained model: GIF + PNG strip

Schedules come from the real configs (conf/schedule/), so a new schedule file shows up here without code.
Each subcommand is one entry of `COMMANDS` (arguments + function), so more can be added beside them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from diffusion_lab import CONFIG_DIR  # noqa: E402

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
    """{config name: NoiseSchedule} for every conf/schedule/*.yaml, composed and instantiated by Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from diffusion_lab.diffusion.schedules import BETA_SCHEDULES

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        names = [p.stem for p in (CONF_DIR / "schedule").glob("*.yaml")]
        cfgs = {name: compose(config_name=f"schedule/{name}").schedule for name in names}
    GlobalHydra.instance().clear()
    schedules = {name: instantiate(cfg, num_timesteps=num_timesteps) for name, cfg in cfgs.items()}
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
# Subcommands
# ---------------------------------------------------------------------------------------------------------


def plot_schedules(args: argparse.Namespace) -> Path:
    schedules = load_schedules(args.timesteps)
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
    return _save(fig, args.out, "schedules.png")


def plot_forward(args: argparse.Namespace) -> Path:
    from diffusion_lab.data.mnist import load_split

    images, labels = load_split(args.data_dir, train=False)
    image = images[args.index].float() / 127.5 - 1  # (1, 28, 28) in [-1, 1]
    schedules = load_schedules(args.timesteps)
    timesteps = column_timesteps(args.timesteps)
    tiles = forward_tiles(image, schedules, timesteps, args.seed)  # (S, C, 1, 28, 28)
    pad = 2
    grid = make_grid(
        ((tiles.flatten(0, 1) + 1) / 2).clamp(0, 1), nrow=len(timesteps), padding=pad, pad_value=1
    )
    fig, ax = plt.subplots(figsize=FORWARD_FIGSIZE, dpi=DPI)
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    centre = [pad + i * (28 + pad) + 14 for i in range(max(len(timesteps), len(schedules)))]
    ax.set_xticks(centre[: len(timesteps)], [str(t) for t in timesteps])
    ax.set_yticks(centre[: len(schedules)], list(schedules))
    ax.set(
        xlabel="t",
        title=f"forward process q(x_t | x_0) of test digit #{args.index} (label {labels[args.index]})",
    )
    fig.tight_layout()
    return _save(fig, args.out, "forward.png")


def _save(fig, out: str | Path, name: str) -> Path:
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _schedule_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timesteps", type=int, default=1000, help="T, the number of training steps")


def _forward_args(parser: argparse.ArgumentParser) -> None:
    _schedule_args(parser)
    parser.add_argument("--data-dir", default=os.environ.get("DLAB_DATA_DIR", "data"), help="MNIST root")
    parser.add_argument("--index", type=int, default=0, help="which test-split digit to noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (shared) noise")


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1).add(1).div(2)


@torch.no_grad()
def plot_trajectory(args: argparse.Namespace) -> Path:
    """One sample per class through the reverse process: `trajectory.gif` (x_t above x̂₀ at every step)
    and `trajectory.png` (rows = classes; x_t at `--columns` steps, then x̂₀ at the same steps)."""
    from PIL import Image

    from diffusion_lab.sample import load_module

    module, _ = load_module(args.ckpt)
    sampler = module.make_sampler(num_steps=args.steps) if args.steps else module.sampler
    labels = torch.arange(module.encoder.num_classes)
    generator = torch.Generator().manual_seed(args.seed)
    _, steps = module.generate(labels, args.guidance, sampler, generator, return_intermediates=True)
    x_t, x0 = torch.stack(steps["x_t"], 1), torch.stack(steps["x0"], 1)  # (classes, steps, C, H, W)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for k in range(x_t.shape[1]):
        both = torch.cat([_to_unit(x_t[:, k]), _to_unit(x0[:, k])])  # row 1: x_t, row 2: x̂₀
        grid = make_grid(both, nrow=len(labels), padding=2, pad_value=1.0)
        frame = Image.fromarray(grid.mul(255).byte().permute(1, 2, 0).numpy())
        frames.append(frame.resize((frame.width * 3, frame.height * 3), Image.NEAREST))
    gif = out / "trajectory.gif"
    durations = [80] * (len(frames) - 1) + [2000]  # ms; hold the final samples
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=durations, loop=0)

    picks = torch.linspace(0, x_t.shape[1] - 1, min(args.columns, x_t.shape[1])).round().long()
    strip = torch.cat([x_t[:, picks], x0[:, picks]], dim=1)  # (classes, 2 * columns, C, H, W)
    grid = make_grid(_to_unit(strip.flatten(0, 1)), nrow=strip.shape[1], padding=2, pad_value=1.0)
    fig = plt.figure(figsize=(grid.shape[2] / DPI, grid.shape[1] / DPI + 0.3))
    ax = fig.add_axes((0, 0, 1, grid.shape[1] / (grid.shape[1] + 0.3 * DPI)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    timesteps = [sampler.timesteps[i].item() for i in picks]
    fig.suptitle(f"x_t (left) and x̂₀ (right) at t = {timesteps}, guidance {args.guidance:g}", fontsize=8)
    print(f"wrote {gif}")
    return _save(fig, out, "trajectory.png")


def _trajectory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default="last", help="checkpoint: `last`, a run folder or a .ckpt file")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sampler)")
    parser.add_argument("--columns", type=int, default=8, help="steps shown in the PNG strip")
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Path]


COMMANDS: dict[str, Command] = {
    "schedules": Command("ᾱ_t and log-SNR vs t for every schedule", _schedule_args, plot_schedules),
    "forward": Command("a real digit noised at t = 0 … T, one row per schedule", _forward_args, plot_forward),
    "trajectory": Command(
        "the reverse process of a checkpoint: GIF and PNG strip", _trajectory_args, plot_trajectory
    ),
}


def draw(argv: list[str] | None = None) -> Path:
    """Parse `argv` (default: sys.argv), run the subcommand, return the PNG it wrote."""
    parser = argparse.ArgumentParser(prog="dlab-viz", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("--out", default="outputs/viz", help="folder for the PNG")
        command.add_arguments(p)
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None because console scripts pass the return value to sys.exit."""
    draw(argv)


if __name__ == "__main__":
    main()
