"""Training throughput of ConditionalUNet (default preset, conf/model/unet_small.yaml) per conditioning
method vs diffusers.

One training step = class encoder + net forward, eps-MSE, backward, AdamW step, at batch 128 on
2 CPU threads. The peer is diffusers' `UNet2DModel` with the same block_out_channels and
layers_per_block, attention at 7x7 and a class embedding, run natively at 28x28 (its two
downsamplings divide 28, so no padding to 32 is needed). Models are timed in interleaved rounds and the
median is kept, which matters on a shared machine. Prints a table, writes benchmarks/results/*.json.

    python benchmarks/bench_unet_throughput.py [--steps 2 --rounds 3 --device cpu --amp]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab import CONFIG_DIR
from diffusion_lab.nets.conditioning import (
    AdaLNConditioning,
    ConcatConditioning,
    CrossAttnConditioning,
    NoConditioning,
)
from diffusion_lab.nets.encoders import ClassEncoder
from diffusion_lab.nets.unet import ConditionalUNet

RESULTS = Path(__file__).resolve().parent / "results" / "unet_throughput.json"
PRESET = OmegaConf.load(Path(CONFIG_DIR) / "model" / "unet_small.yaml")
SMALL = {k: PRESET[k] for k in ("channels", "num_res_blocks", "attention_resolutions", "attention_heads")}
METHODS = {
    "none": NoConditioning,
    "concat": ConcatConditioning,
    "cross_attn": CrossAttnConditioning,
    "adaln": AdaLNConditioning,
}


class OursStep(torch.nn.Module):
    """encoder + ConditionalUNet, called like the LightningModule's training step calls them."""

    def __init__(self, method: str, dim: int = 128):
        super().__init__()
        self.encoder = ClassEncoder(dim=dim)
        self.net = ConditionalUNet(functools.partial(METHODS[method], cond_dim=dim), **SMALL)

    def forward(self, x, t, labels):
        return self.net(x, t, self.encoder(labels))


class DiffusersStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=28,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(SMALL["channels"]),
            layers_per_block=SMALL["num_res_blocks"],
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=32,  # 4 heads at 128 channels, as ours
            num_class_embeds=11,  # 10 classes + null, added to the time embedding
        )

    def forward(self, x, t, labels):
        return self.net(x, t, class_labels=labels).sample


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def gflops_per_image(model: torch.nn.Module, device: str) -> float:
    x, t, y = torch.randn(1, 1, 28, 28, device=device), torch.tensor([500], device=device), torch.tensor([3])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y.to(device)).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device

    builders = {f"ours/{m}": functools.partial(OursStep, m) for m in METHODS} | {"diffusers": DiffusersStep}
    runs = {}
    for name, build in builders.items():
        model = build().to(dev)
        info = {
            "params": sum(p.numel() for p in model.net.parameters()),
            "gflop": gflops_per_image(model, dev),
        }
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch, 1, 28, 28, device=dev)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        labels, noise = torch.randint(0, 10, (args.batch,), device=dev), torch.randn_like(x)

        def step(model=model, opt=opt, x=x, t=t, labels=labels, noise=noise):
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.amp):
                loss = (model(x, t, labels).float() - noise).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        runs[name] = (step, info, [])

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    load_before = os.getloadavg()
    for step, _, _ in runs.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.rounds):  # interleaved, so a burst of load from elsewhere hits every model alike
        for step, _, rates in runs.values():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            rates.append(args.steps * args.batch / (time.perf_counter() - start))
    load_after = os.getloadavg()

    peer = statistics.median(runs["diffusers"][2])
    rows = {}
    print(f"\nbatch {args.batch}, {args.threads} threads, {dev}, amp={args.amp}, load {load_before[0]:.1f}")
    print(f"{'model':<18}{'params':>10}{'GFLOP/img':>11}{'img/s':>9}{'vs diffusers':>14}")
    for name, (_, info, rates) in runs.items():
        med = statistics.median(rates)
        rows[name] = {**info, "img_per_s": med, "img_per_s_rounds": rates, "ratio_vs_diffusers": med / peer}
        print(f"{name:<18}{info['params']:>10,}{info['gflop']:>11.2f}{med:>9.1f}{med / peer:>13.2f}x")

    result = {
        "what": "training step img/s (class encoder + net fwd, eps-MSE, backward, AdamW), median over rounds",
        "batch": args.batch,
        "threads": args.threads,
        "device": dev,
        "amp_bf16": args.amp,
        "channels_last": args.channels_last,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "peer": "diffusers UNet2DModel (32,64,128) x2 blocks, attn@7, 28x28 unpadded",
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
