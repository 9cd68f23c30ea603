"""GPU check: eager vs torch.compile training throughput (bf16 autocast) for each conditioning method,
plus sampling throughput. Run on a CUDA machine; writes benchmarks/results/gpu_check.json (or --out)."""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from diffusion_lab.diffusion.samplers import DDIMSampler, sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.nets import conditioning as methods
from diffusion_lab.nets.encoders import ClassEncoder
from diffusion_lab.nets.unet import ConditionalUNet

METHODS = {"concat": methods.ConcatConditioning, "cross_attn": methods.CrossAttnConditioning,
           "adaln": methods.AdaLNConditioning}  # fmt: skip


def train_throughput(net, encoder, batch: int, steps: int) -> float:
    """Images per second of forward + backward + AdamW in bf16 autocast (after warm-up/compilation)."""
    schedule = NoiseSchedule("cosine").cuda()
    opt = torch.optim.AdamW([*net.parameters(), *encoder.parameters()], lr=1e-4)
    x0 = torch.randn(batch, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        t = torch.randint(0, 1000, (batch,), device="cuda")
        noise = torch.randn_like(x0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(schedule.add_noise(x0, noise, t), t, encoder(labels))
            loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", nargs="*", default=["adaln"], help="methods to also time compiled")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch}
    for name, cls in METHODS.items():
        row = {}
        for mode in ("eager", "compiled") if name in args.compile else ("eager",):
            torch.manual_seed(0)
            net = ConditionalUNet(conditioning=functools.partial(cls, cond_dim=128)).cuda()
            encoder = ClassEncoder(dim=128).cuda()
            if mode == "compiled":
                net.compile()
            started = time.perf_counter()
            row[mode] = train_throughput(net, encoder, args.batch, args.steps)
            row[f"{mode}_wall_s"] = time.perf_counter() - started
        if "compiled" in row:
            row["compile_speedup"] = row["compiled"] / row["eager"]
        results[name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)

    # Sampling: DDIM 50 steps with CFG (one batched forward per step), 1000 images.
    net = (
        ConditionalUNet(conditioning=functools.partial(methods.AdaLNConditioning, cond_dim=128)).cuda().eval()
    )
    encoder = ClassEncoder(dim=128).cuda().eval()
    labels = torch.arange(1000, device="cuda") % 10
    sampler = DDIMSampler(NoiseSchedule("cosine"), num_steps=50)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        images = sample(net, sampler, (1000, 1, 28, 28), encoder(labels), encoder.null(1000, "cuda"),
                        guidance_scale=3.0, generator=torch.Generator().manual_seed(0), device="cuda")  # fmt: skip
    torch.cuda.synchronize()
    results["sampling_img_per_s_ddim50_cfg"] = 1000 / (time.perf_counter() - start)
    results["sampling_finite"] = bool(torch.isfinite(images).all())
    print("sampling", results["sampling_img_per_s_ddim50_cfg"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
