#!/usr/bin/env bash
# The device check, run once on a lent GPU machine from the repo root:
#   .gpu/site holds hydra-core, omegaconf and antlr4 (missing there); .gpu/mnist the gzipped MNIST files.
set -uo pipefail
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1 DLAB_DATA_DIR=/tmp/mnist WANDB_MODE=offline
mkdir -p /tmp/mnist/MNIST/raw
for f in .gpu/mnist/*.gz; do gunzip -c "$f" > "/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"; done
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# 1. The real CLI on one GPU: bf16-mixed, torch.compile, 2 epochs of the adaLN recipe.
start=$(date +%s)
python -m diffusion_lab.train experiment=mnist_adaln trainer.max_epochs=2 module.compile=true \
  callbacks.rich_progress_bar=null hydra.run.dir="$OUT/run" 2>&1 | grep -v "^\s*$" | tail -25
echo "cli_train_wall_s=$(( $(date +%s) - start ))"
cp "$OUT"/run/samples/*.png "$OUT"/ 2>/dev/null; rm -rf "$OUT/run/checkpoints" "$OUT/run/.hydra"
# 2. Eager vs compiled throughput per conditioning method, and sampling throughput.
python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"
