"""What Lightning costs: `Trainer.fit` img/s against a plain PyTorch loop, and the data alone.

Both loops train the same DiffusionModule, built from the real config (`conf/train.yaml` composed
with Hydra, plus any overrides given on the command line), on the same DataModule batches, with the
same optimizer, LR schedule and gradient clipping (`trainer.gradient_clip_val`):

- lightning: `Trainer.fit` with the config's trainer settings (precision, clipping), no validation,
  checkpoints, logger or progress bar; the module's own hooks (per-batch reseeding, the divergence
  guard) run as in training;
- plain: `diffusion_loss` -> backward -> clip -> optimizer and scheduler step, nothing else;
- data: the DataModule's train loader alone, batches moved to the device.

The two loops alternate in rounds and the median is kept (the machine is shared). Timing starts
after `--warmup` steps of each fit, so Trainer and compile setup are not counted.

    python benchmarks/loop_overhead.py [--steps 20 --rounds 3] [model=unet_tiny data.batch_size=128 ...]
    python benchmarks/loop_overhead.py --device cuda --precision bf16 [--compile] data.batch_size=256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from diffusion_lab import CONFIG_DIR
from diffusion_lab.utils import resolvers
from diffusion_lab.utils.instantiate import build, build_module

RESULTS = Path(__file__).resolve().parent / "results" / "loop_overhead.json"
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


def load_config(overrides: list[str], device: str, precision: str, compile_: bool, out: str):
    resolvers.register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.trainer.accelerator = "gpu" if device.startswith("cuda") else "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.precision = PRECISION[precision]
        cfg.module.compile = compile_
    return cfg


class Clock(L.Callback):
    """Wall time at the end of every training batch (synchronised on CUDA)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def rate(ends: list[float], warmup: int, batch: int) -> float:
    return (len(ends) - warmup) * batch / (ends[-1] - ends[warmup - 1])


def lightning_round(cfg, datamodule, steps: int, warmup: int, batch: int) -> float:
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    clock = Clock()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        max_steps=warmup + steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        default_root_dir=cfg.paths.output_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    return rate(clock.ends, warmup, batch)


def plain_round(cfg, datamodule, steps: int, warmup: int, batch: int, device: str, precision: str) -> float:
    torch.manual_seed(cfg.seed)
    module = build_module(cfg).to(device).train()
    if cfg.module.compile:
        module.net.compile()
    optimizer = module.build_optimizer(PRECISION[precision])  # as configure_optimizers builds it
    scheduler = None
    if module.lr_scheduler_factory is not None:
        kwargs = (
            {} if module.lr_scheduler_factory.keywords.get("total_steps") else {"total_steps": warmup + steps}
        )
        scheduler = module.lr_scheduler_factory(optimizer=optimizer, **kwargs)
    clip = cfg.trainer.get("gradient_clip_val")
    cuda = device.startswith("cuda")
    ends = []
    loader = datamodule.train_dataloader()
    while len(ends) < warmup + steps:
        for batch in loader:
            batch = to_device(batch, device)
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=precision == "bf16"):
                loss = module.diffusion_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if len(ends) == warmup + steps:
                break
    return rate(ends, warmup, batch["image"].shape[0])


def data_rate(datamodule, batches: int, device: str) -> float:
    """Batches/s of the train loader alone, each batch moved to the device."""
    loader, seen = datamodule.train_dataloader(), 0
    start = time.perf_counter()
    while seen < batches:
        for batch in loader:
            batch = to_device(batch, device)
            seen += 1
            if seen == batches:
                break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batches / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=tuple(PRECISION), default="fp32")
    ap.add_argument("--compile", action="store_true", help="module.compile=true in both loops")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per loop per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-batches", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="loop_overhead_")
    cfg = load_config(args.overrides, args.device, args.precision, args.compile, tmp)
    batch = int(cfg.data.batch_size)

    datamodule = build("datamodule", cfg.data)
    datamodule.setup("fit")
    data = data_rate(datamodule, args.data_batches, args.device)

    load_before = os.getloadavg()
    lightning, plain = [], []
    for _ in range(args.rounds):
        lightning.append(lightning_round(cfg, datamodule, args.steps, args.warmup, batch))
        plain.append(
            plain_round(cfg, datamodule, args.steps, args.warmup, batch, args.device, args.precision)
        )
    load_after = os.getloadavg()
    lightning_med, plain_med = statistics.median(lightning), statistics.median(plain)

    result = {
        "what": "training img/s: Trainer.fit vs a plain loop (same module, data, optimizer, clipping); "
        "train loader batches/s alone",
        "ratio_lightning_vs_plain": lightning_med / plain_med,
        "lightning_img_per_s": lightning_med,
        "plain_img_per_s": plain_med,
        "data_batches_per_s": data,
        "data_img_per_s": data * batch,
        "data_vs_training_batches": data / (plain_med / batch),
        "lightning_rounds": lightning,
        "plain_rounds": plain,
        "batch": batch,
        "overrides": args.overrides,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "precision": args.precision,
        "compile": args.compile,
        "threads": args.threads,
        "steps_per_round": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
    }
    print(
        f"\n{args.device}, batch {batch}, {args.precision}, compile={args.compile}, load "
        f"{load_before[0]:.1f}->{load_after[0]:.1f}\n"
        f"  Trainer.fit  {lightning_med:8.1f} img/s   rounds {[round(r, 1) for r in lightning]}\n"
        f"  plain loop   {plain_med:8.1f} img/s   rounds {[round(r, 1) for r in plain]}\n"
        f"  ratio        {lightning_med / plain_med:8.3f}x  (target >= 0.95)\n"
        f"  data alone   {data:8.1f} batches/s = {data * batch:.0f} img/s "
        f"({data / (plain_med / batch):.0f}x the training step rate)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
