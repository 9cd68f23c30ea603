"""Training throughput of ConditionalUNet per conditioning method against diffusers' U-Nets.

One training step = condition encoder + net forward, eps-MSE, backward, AdamW step (the repo's
`conf/optimizer` config, built for every model alike). In one process, with the same batch, threads
and precision:

- ours: `conf/model/<--model>.yaml` (default: the `make train` recipe's) with each
  `conf/conditioning/<method>.yaml` (the recipe's first);
- `unet2d`: diffusers' `UNet2DModel` with a class embedding (added to the time embedding);
- `unet2d_condition`: diffusers' `UNet2DConditionModel` with cross-attention to the class token;

each peer at the same block widths as ours ("width") and at a width searched so its parameter count
is within 10% of ours for that method ("params"). The models are timed in interleaved rounds with a
large matmul (fp32 on CPU, bf16 on CUDA) as the machine's practical peak, so a burst of load from
elsewhere hits every model and the peak alike; medians are kept. FLOPs per image (forward +
backward) come from `FlopCounterMode`, with attention on the math backend so that it is counted.

    python benchmarks/train_throughput.py                                   # CPU, fp32, a few minutes
    python benchmarks/train_throughput.py --device cuda --precision bf16 [--compile] --batch 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab import CONFIG_DIR

CONF = Path(CONFIG_DIR)
RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
METHODS = ("concat", "cross_attn", "adaln")
COND_DIM = 128  # conf/condition/class.yaml's dim
TOLERANCE = 0.10  # matched parameter count: within 10%


# --------------------------------------------------------------------------- the models


def config(group: str, name: str):
    return OmegaConf.load(CONF / group / f"{name}.yaml")


def recipe_choice(group: str) -> str:
    """The default recipe's option of a group: `override /<group>` in conf/experiment/mnist_cpu.yaml."""
    defaults = config("experiment", "mnist_cpu").defaults
    return next(entry[f"override /{group}"] for entry in defaults if f"override /{group}" in entry)


def option_config(group: str, name: str):
    """conf/<group>/<name>.yaml with its `defaults` (an option may extend another) merged in."""
    cfg = config(group, name)
    for base in cfg.pop("defaults", []):
        if base != "_self_":
            cfg = OmegaConf.merge(option_config(group, base), cfg)
    return cfg


class Ours(torch.nn.Module):
    """The condition encoder and the net, called as the LightningModule's training step calls them."""

    def __init__(self, model: str, method: str, channels_last: bool = True):
        super().__init__()
        cfg = OmegaConf.create(
            {
                "condition": {**config("condition", "class"), "dim": COND_DIM},
                "conditioning": option_config("conditioning", method),
                "data": {"channels": 1, "image_size": 28},
                "model": option_config("model", model),
            }
        )
        self.encoder = instantiate(cfg.condition)
        self.net = instantiate(cfg.model, channels_last=channels_last)
        self.widths = [int(c) for c in cfg.model.channels]
        self.blocks = int(cfg.model.num_res_blocks)

    def forward(self, x, t, labels):
        return self.net(x, t, self.encoder(labels))


def peer_shape(widths, blocks: int, attn: str) -> dict:
    """The diffusers arguments both peers share: 28x28 natively (its two downsamplings divide 28, so
    no padding to 32), our widths and blocks per level, attention (`attn` blocks) at the lowest level."""
    n = len(widths)
    return dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(widths),
        layers_per_block=blocks,
        down_block_types=("DownBlock2D",) * (n - 1) + (f"{attn}DownBlock2D",),
        up_block_types=(f"{attn}UpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=8,
    )


class UNet2D(torch.nn.Module):
    """diffusers' UNet2DModel; the label enters as a class embedding added to the time embedding."""

    def __init__(self, widths, blocks: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            **peer_shape(widths, blocks, "Attn"),
            attention_head_dim=widths[-1] // 4,  # 4 heads, as ours
            num_class_embeds=11,  # 10 classes + the null label
        )

    def forward(self, x, t, labels):
        return self.net(x, t, class_labels=labels).sample


class UNet2DCondition(torch.nn.Module):
    """diffusers' UNet2DConditionModel; cross-attention to our class encoder's token (B, 1, 128)."""

    def __init__(self, widths, blocks: int):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from diffusion_lab.nets.encoders import ClassEncoder

        self.encoder = ClassEncoder(dim=COND_DIM)
        self.net = UNet2DConditionModel(
            **peer_shape(widths, blocks, "CrossAttn"),
            cross_attention_dim=COND_DIM,
            attention_head_dim=4,  # diffusers reads this as the number of heads here
        )

    def forward(self, x, t, labels):
        return self.net(x, t, encoder_hidden_states=self.encoder(labels).tokens).sample


def net_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.net.parameters())


def match_widths(peer: type, target: int, base: list[int], blocks: int) -> tuple[list[int], int]:
    """Block widths (multiples of 8, `base`'s shape) whose peer has the parameter count nearest
    `target` (the same widths when they are nearest). Counted on the meta device: no real weights."""
    best = None
    for top in range(16, 8 * 129, 8):
        scale = top / base[-1]  # keep the shape of `base`, nudging the lower levels
        shaped = [max(8, 8 * round(c * scale / 8)) for c in base[:-1]]
        counts = []
        for nudge in (-8, 0, 8):  # finer steps than the top width alone gives
            widths = [max(8, c + nudge) for c in shaped] + [top]
            with torch.device("meta"):
                counts.append(n := net_params(peer(widths, blocks)))
            if best is None or abs(math.log(n / target)) < abs(math.log(best[1] / target)):
                best = (widths, n)
        if min(counts) > 1.5 * target:
            break
    return best


# --------------------------------------------------------------------------- measuring


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def flops_per_image(model: torch.nn.Module, device: str, batch: int = 2) -> float:
    """Forward + backward FLOPs of one image (attention on the math backend, so its matmuls count)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


class Peak:
    """A large matmul: the machine's practical peak FLOP/s (fp32 on CPU, bf16 on CUDA)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        n = 8192 if self.cuda else 2048
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.flop = 2 * n**3
        self.reps = 20 if self.cuda else 2
        self.dtype = str(dtype).removeprefix("torch.")
        self.shape = n

    def __call__(self) -> float:
        sync(self.cuda)
        start = time.perf_counter()
        for _ in range(self.reps):
            torch.mm(self.a, self.b)
        sync(self.cuda)
        return self.reps * self.flop / (time.perf_counter() - start)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def make_step(model, args) -> Callable[[], None]:
    dev, b = args.device, args.batch
    # Fused as DiffusionModule.build_optimizer fuses it: not under mixed precision (bf16 here).
    fused = args.fused == "on" or (args.fused == "auto" and args.precision == "fp32")
    optimizer = instantiate(config("optimizer", args.optimizer))(params=model.parameters(), fused=fused)
    x = torch.randn(b, 1, 28, 28, device=dev)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,), device=dev)
    labels, noise = torch.randint(0, 10, (b,), device=dev), torch.randn_like(x)
    forward = torch.compile(model) if args.compile else model
    bf16 = args.precision == "bf16"

    def step():
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = (forward(x, t, labels).float() - noise).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model", default=recipe_choice("model"), help="our preset, conf/model/<name>.yaml")
    default_method = recipe_choice("conditioning")  # first: the ratio keys the targets read
    methods = [default_method] + [m for m in METHODS if m != default_method]
    ap.add_argument(
        "--methods", default=",".join(methods), help="conf/conditioning/<name>.yaml, comma-separated"
    )
    ap.add_argument("--optimizer", default="adamw", help="conf/optimizer/<name>.yaml, for every model")
    ap.add_argument("--fused", choices=("auto", "on", "off"), default="auto", help="auto: as training")
    ap.add_argument(
        "--peer-shape",
        default="32,64,128",
        help="the widths whose ratios the matched peers keep (1:2:4, diffusers' usual shape); "
        "'ours' gives them our own ratios",
    )
    ap.add_argument("--channels-last", action="store_true", help="peers too (ours is channels-last already)")
    ap.add_argument("--layout-ab", action="store_true", help="add ours/<last method> with NCHW maps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    methods = args.methods.split(",")

    # ----------------------------------------------------------------- the line-up
    models: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    for method in methods:
        torch.manual_seed(0)
        models[f"ours/{method}"] = Ours(args.model, method)
    if args.layout_ab:  # the last method again with NCHW maps: what channels-last buys, in the same rounds
        torch.manual_seed(0)
        models[f"ours/{methods[-1]}-nchw"] = Ours(args.model, methods[-1], channels_last=False)
    ours0 = models[f"ours/{methods[0]}"]
    widths, blocks = ours0.widths, ours0.blocks
    # The peers at matched parameters are shaped 1:2:4 by default: that puts their parameters at low
    # resolution, where they cost the fewest FLOPs, so it is the fairer match. Our own 1:2:2 ratios
    # (`--peer-shape ours`) spend a peer's parameters at high resolution and flatter our ratios.
    peer_shape_widths = widths if args.peer_shape == "ours" else [int(c) for c in args.peer_shape.split(",")]
    peers = {"unet2d": UNet2D, "unet2d_condition": UNet2DCondition}
    matched: dict[str, dict[str, str]] = {name: {} for name in peers}  # peer -> method -> model name
    for peer, cls in peers.items():
        models[f"{peer}/width"] = cls(widths, blocks)
        info[f"{peer}/width"] = {"widths": widths, "layers_per_block": blocks}
        for method in methods:
            target = net_params(models[f"ours/{method}"])
            w, n = match_widths(cls, target, peer_shape_widths, blocks)
            if abs(n / target - 1) > TOLERANCE:
                print(
                    f"warning: no {peer} within 10% of ours/{method}'s {target:,} parameters (nearest {n:,})"
                )
            name = f"{peer}/width" if w == widths else f"{peer}/{'-'.join(map(str, w))}"
            if name not in models:
                torch.manual_seed(0)
                models[name] = cls(w, blocks)
                info[name] = {"widths": w, "layers_per_block": blocks}
            matched[peer][method] = name

    steps, rates, cpu_rates = {}, {}, {}
    for name, model in models.items():
        model.to(args.device)
        info.setdefault(name, {})
        info[name]["params"] = net_params(model)
        info[name]["flops_per_image"] = flops_per_image(model, args.device)
        steps[name] = make_step(model, args)
        rates[name], cpu_rates[name] = [], []

    # ----------------------------------------------------------------- interleaved rounds
    peak = Peak(args.device)
    peaks = []
    load_before = os.getloadavg()
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    peak()
    for _ in range(args.rounds):
        peaks.append(peak())
        for name, step in steps.items():
            sync(cuda)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            sync(cuda)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rates[name].append(args.steps * args.batch / wall)
            cpu_rates[name].append(args.steps * args.batch / cpu)
    load_after = os.getloadavg()
    peak_flops = statistics.median(peaks)

    # ----------------------------------------------------------------- results
    rows = {}
    for name in models:
        med = statistics.median(rates[name])
        rows[name] = {
            **info[name],
            "img_per_s": med,
            "img_per_s_rounds": rates[name],
            "img_per_cpu_s": statistics.median(cpu_rates[name]),
            "flops_per_s": med * info[name]["flops_per_image"],
            "peak_fraction": med * info[name]["flops_per_image"] / peak_flops,
        }
    ratios = {}
    for method in methods:
        ours = rows[f"ours/{method}"]
        for peer in peers:
            for kind, name in (("", matched[peer][method]), ("_width", f"{peer}/width")):
                ratios[f"ratio_vs_{peer}_{method}{kind}"] = ours["img_per_s"] / rows[name]["img_per_s"]
                ratios[f"params_ratio_vs_{peer}_{method}{kind}"] = ours["params"] / rows[name]["params"]

    print(
        f"\n{args.device} {torch.cuda.get_device_name() if cuda else cpu_name()}, batch {args.batch}, "
        f"{args.threads} threads, {args.precision}, compile={args.compile}, fused={args.fused}, "
        f"channels_last={args.channels_last}, "
        f"load {load_before[0]:.1f}->{load_after[0]:.1f}; peak ({peak.dtype} matmul {peak.shape}) "
        f"{peak_flops / 1e9:.0f} GFLOP/s"
    )
    print(f"{'model':<26}{'params':>11}{'GFLOP/img':>10}{'img/s':>9}{'img/cpu-s':>10}{'of peak':>9}")
    for name, row in rows.items():
        print(
            f"{name:<26}{row['params']:>11,}{row['flops_per_image'] / 1e9:>10.3f}{row['img_per_s']:>9.1f}"
            f"{row['img_per_cpu_s']:>10.1f}{row['peak_fraction']:>9.1%}"
        )
    print(
        f"\n{'ours / peer':<16}{'unet2d params':>15}{'unet2d width':>14}{'cond params':>13}{'cond width':>12}"
    )
    for method in methods:
        cells = [ratios[f"ratio_vs_{peer}_{method}{kind}"] for peer in peers for kind in ("", "_width")]
        print(f"{method:<16}" + "".join(f"{c:>13.2f}x " for c in cells))
    for method in methods:
        for peer in peers:
            name = matched[peer][method]
            print(
                f"  {method} matched with {name}: params {rows[f'ours/{method}']['params']:,} vs "
                f"{rows[name]['params']:,}"
            )

    result = {
        "what": "training step img/s (encoder + net forward, eps-MSE, backward, optimizer step), "
        "median over interleaved rounds",
        **ratios,
        "matched": matched,
        "batch": args.batch,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "fused_optimizer": args.fused,
        "optimizer": OmegaConf.to_container(config("optimizer", args.optimizer)),
        "model_preset": args.model,
        "peer_shape": peer_shape_widths,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup": args.warmup,
        "peak_flops_per_s": peak_flops,
        "peak_rounds": peaks,
        "peak_what": f"{peak.dtype} matmul {peak.shape}^3",
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
