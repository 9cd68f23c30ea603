#!/usr/bin/env bash
# The README's results, made on a lent GPU in one run from the repo root:
#   1. `dlab-eval` (defaults: n=5000, guidance 0/1/2/4, steps sweep) on the `make train` checkpoint;
#   2. a conditioning-method sweep (the GPU recipes, 2 epochs each) with FID at the end, then dlab-report.
# .gpu/site: hydra-core, omegaconf, antlr4; .gpu/mnist: gzipped MNIST; .gpu/cache: the evaluator;
# .gpu/make_train.ckpt: the CPU run's checkpoint.
set -uo pipefail
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1 DLAB_DATA_DIR=/tmp/mnist DLAB_CACHE_DIR="$PWD/.gpu/cache"
mkdir -p /tmp/mnist/MNIST/raw
for f in .gpu/mnist/*.gz; do gunzip -c "$f" > "/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"; done
OUT=${OUT:-/tmp/out}; WORK=/tmp/work; mkdir -p "$OUT" "$WORK"
start=$(date +%s)
python -m diffusion_lab.evaluate ckpt_path=.gpu/make_train.ckpt batch_size=1000 out="$WORK/eval" 2>&1 | grep -E "guidance|wrote|Error" | tail -8
echo "eval_wall_s=$(( $(date +%s) - start ))"
python -m diffusion_lab.train -m experiment=mnist_concat,mnist_cross_attn,mnist_adaln trainer.max_epochs=2 \
  callbacks=with_metrics callbacks.generative_metrics.n=1000 callbacks.generative_metrics.every_n_epochs=2 \
  callbacks.rich_progress_bar=null hydra.sweep.dir="$WORK/sweep" 2>&1 | grep -E "final metrics|Error" | tail -8
echo "sweep_wall_s=$(( $(date +%s) - start ))"
python -m diffusion_lab.report sweep="$WORK/sweep" out="$WORK/report"
# $OUT takes few files: the headline ones flat, everything else (no checkpoints) in one archive.
cp "$WORK"/eval/eval.json "$WORK"/eval/guidance.png "$WORK"/eval/steps.png "$WORK"/report/report.md "$OUT"/
tar czf "$OUT/results.tgz" --exclude="*.ckpt" -C "$WORK" .
