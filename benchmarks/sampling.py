"""Sampling speed and quality per sampler: img/s with classifier-free guidance, and the fewest steps
at which each sampler stays within 1 point of accuracy and 10% FID of DDPM with 1000 steps.

For a trained checkpoint (`--ckpt`: a .ckpt, a run folder or `last`), with `diffusion_lab.inference`
(load_module with the EMA weights, resolve_sampler, generate_batched: the same seeds as `dlab-eval`):

- speed: DDPM 1000, DDIM 50, DPM-Solver++ 10 and 20, img/s over `--n` images (CFG: the conditional
  and unconditional passes batched together);
- quality: DDPM 1000 is the reference; DDPM, DDIM and DPM-Solver++ go up a ladder of step counts
  (`--ladder`) and stop at the first that passes (accuracy >= reference - 0.01 and FID <= 1.1 x the
  reference's), scored by the cached MNIST evaluator (`dlab-train-evaluator`, DLAB_CACHE_DIR). FID
  needs `--n` >= 256; with fewer images only the speed is measured.

    python benchmarks/sampling.py --ckpt last --n 64 --quality off                # CPU: speed only
    python benchmarks/sampling.py --ckpt last --n 16 --speed ddim_50,dpmpp_10 --threads 1   # a quick check
    python benchmarks/sampling.py --ckpt <run> --device cuda --n 1000 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab import CONFIG_DIR
from diffusion_lab.inference import generate_batched, load_module, resolve_sampler
from diffusion_lab.metrics.targets import targets_for

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"
SPEED = (("ddpm", 1000), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20))
LADDER = (5, 8, 10, 15, 20, 25, 35, 50, 100, 250, 500, 1000)


def sampler_config(name: str):
    return OmegaConf.load(Path(CONFIG_DIR) / "sampler" / f"{name}.yaml")


class Runner:
    """Generates `n` images for the benchmark's targets with one sampler, timing it."""

    def __init__(self, module, targets, args):
        self.module, self.targets, self.args = module, targets, args
        self.cuda = args.device.startswith("cuda")

    def __call__(self, name: str, steps: int) -> tuple[torch.Tensor, float]:
        sampler = resolve_sampler(self.module, instantiate(sampler_config(name)), steps)
        bf16 = self.args.precision == "bf16"
        autocast = (
            torch.autocast(self.args.device.split(":")[0], torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            images = generate_batched(
                self.module,
                self.targets.inputs,
                self.args.guidance,
                sampler,
                self.args.batch_size,
                0,
                progress=False,
            )
        if self.cuda:
            torch.cuda.synchronize()
        return images, len(images) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="last", help="a .ckpt, a run folder, or last")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the net")
    ap.add_argument("--n", type=int, default=64, help="images per point (FID needs >= 256)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--guidance", type=float, default=1.6, help="default: the make-train recipe's best scale")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--speed", default=",".join(f"{n}_{s}" for n, s in SPEED), help="sampler_steps points timed"
    )
    ap.add_argument("--quality", choices=("auto", "on", "off"), default="auto", help="auto: when n >= 256")
    ap.add_argument("--ladder", default=",".join(map(str, LADDER)), help="step counts tried, ascending")
    ap.add_argument("--samplers", default="ddpm,ddim,dpmpp", help="samplers for the fewest-steps search")
    ap.add_argument("--reference", default="ddpm_1000", help="sampler_steps the others must match")
    ap.add_argument("--runs-dir", default="outputs/train/runs", help="where `last` looks")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    module, path = load_module(args.ckpt, args.device, args.runs_dir)
    if args.compile:
        module.net.compile()
    targets = targets_for(module, args.n)
    run = Runner(module, targets, args)
    run("ddim", 2)  # warm-up (and compile)
    result = {
        "checkpoint": str(path),
        "n": args.n,
        "guidance": args.guidance,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if run.cuda else None,
        "precision": args.precision,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "loadavg_1min_before": os.getloadavg()[0],
        "img_per_s": {},
    }

    # ----------------------------------------------------------------- speed
    images = {}
    print(f"\n{path}: {args.n} images per point, guidance {args.guidance}, {args.device}, {args.precision}")
    for point in args.speed.split(","):
        name, steps = point.rsplit("_", 1)
        steps = int(steps)
        images[name, steps], rate = run(name, steps)
        result["img_per_s"][f"{name}_{steps}"] = rate
        print(f"  {name:6s} {steps:5d} steps  {rate:9.2f} img/s")

    # ----------------------------------------------------------------- quality: fewest steps
    quality = args.quality == "on" or (args.quality == "auto" and args.n >= 256)
    if quality:
        from diffusion_lab.metrics.fid import MNISTEvaluator

        root = Path(__file__).resolve().parents[1]
        cache = os.environ.get("DLAB_CACHE_DIR", str(root / ".cache"))
        data = os.environ.get("DLAB_DATA_DIR", str(root / "data"))
        evaluator = MNISTEvaluator.from_cache(cache, data)
        evaluator.require(args.n, "--n")
        digits = targets.digits

        def score(name: str, steps: int) -> dict:
            if (name, steps) not in images:
                images[name, steps], rate = run(name, steps)
                result["img_per_s"][f"{name}_{steps}"] = rate
            row = evaluator.evaluate(images[name, steps], digits)
            return {k: row[k] for k in ("fid", "accuracy", "fid_real_floor")}

        ref_name, ref_steps = args.reference.rsplit("_", 1)
        reference = score(ref_name, int(ref_steps))
        result["reference"] = {"sampler": args.reference, **reference}
        result["fewest_steps"], result["ladder"] = {}, {}
        print(f"  reference {args.reference}: accuracy {reference['accuracy']:.3f}, FID {reference['fid']:.2f} "
              f"(floor {reference['fid_real_floor']:.2f})")  # fmt: skip
        for name in args.samplers.split(","):
            result["ladder"][name] = {}
            result["fewest_steps"][name] = None
            for steps in (int(s) for s in args.ladder.split(",")):
                row = score(name, steps)
                row["passes"] = (
                    row["accuracy"] >= reference["accuracy"] - 0.01 and row["fid"] <= 1.1 * reference["fid"]
                )
                result["ladder"][name][str(steps)] = row
                print(f"  {name:6s} {steps:5d} steps  accuracy {row['accuracy']:.3f}  FID {row['fid']:7.2f}"
                      f"  {'pass' if row['passes'] else ''}")  # fmt: skip
                if row["passes"]:
                    result["fewest_steps"][name] = steps
                    break
        print(
            f"  fewest steps within 1 point of accuracy and 10% FID of {args.reference}: {result['fewest_steps']}"
        )
    else:
        print("  quality skipped (FID needs --n >= 256; --quality on forces it)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
