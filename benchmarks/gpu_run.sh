#!/usr/bin/env bash
# The one GPU script (issue 10), run from the repo root on a lent GPU machine:
#   bash benchmarks/gpu_run.sh                 # on the GPU: results in $OUT (at most 8 files)
#   SMOKE=1 PY=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_run.sh   # every code path, tiny, on CPU
# Needs, in the ignored folder .gpu/ (carried to the machine; never committed):
#   .gpu/whl/*.whl    pure-Python wheels missing there: hydra-core, omegaconf, antlr4, hydra-joblib-launcher,
#                     diffusers, importlib_metadata, lazy-importer (installed with --target, not the project)
#   .gpu/mnist/*.gz   the four MNIST IDX files, gzipped
#   .gpu/cache/       the trained evaluator (dlab-train-evaluator with DLAB_CACHE_DIR=.gpu/cache)
# Stages, most valuable first; each is guarded by `timeout` against a deadline measured from the start
# (BUDGET seconds in all), so a slow stage leaves the earlier results in $OUT:
#   A. the recipe sweep: `dlab-train -m` of the CPU recipe in fp32 (so quality transfers to the CPU run
#      with the same steps and batch) over GRID_A, N_JOBS jobs at once on the one GPU (joblib launcher).
#      On the H200 (2026-11-27) 2 jobs at once ran ~15 steps/s each and 9 at once ~3.8 (kernel-launch
#      bound), so size it as (jobs / N_JOBS) x (STEPS_A / 15 + 20) s + ~25 s of setup <= T_SWEEP (half
#      of BUDGET unless set): the default, the recipe at seeds 0 and 1 (its spread), 2,300 steps 2 at a
#      time, is ~210 s of BUDGET=560. Then every job with a checkpoint is scored by `dlab-eval` (N = 5,000
#      at each GUIDANCE, EVAL_PAR at once) while B trains, and benchmarks/gpu_summary.py (its target set by
#      SUMMARY_ARGS) and `dlab-report` tabulate the sweep. A job stopped by the deadline leaves
#      checkpoints/interrupted.ckpt, which is scored as it stands; the same command into the same folder
#      resumes it. GRID_A may name another experiment, e.g. "experiment=mnist_best model=a,b".
#   B. one `experiment=mnist_gpu` training (bf16-mixed, batch 256, torch.compile; GPU_STEPS steps),
#      then dlab-eval at GUIDANCE_B: the bf16, compiled recipe's quality (not yet measured; the fp32
#      experiment=mnist_best was measured through stage A, benchmarks/README.md ## Recipe).
#   C. the speed benchmarks, bf16: loop overhead, then (time allowing) training throughput compiled,
#      sampling.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
SMOKE=${SMOKE:-0}
STAGES=${STAGES:-ABC}          # which stages to run (e.g. STAGES=BC)
BENCHES=${BENCHES:-}           # stage C: only these benchmarks (e.g. "train_throughput_compiled"); empty: all
SUMMARY_ARGS=${SUMMARY_ARGS:-} # gpu_summary.py's target, e.g. "--target-accuracy 0.99 --fid-factor 2" (mnist_best)
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
WORK=${WORK:-/tmp/gpu_work}
BUDGET=${BUDGET:-560}            # seconds for everything; the run call's timeout_s should leave a margin
T0=$(date +%s)
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || sleep 1' EXIT   # let tee write the last lines
elapsed() { echo $(( $(date +%s) - T0 )); }
stage() { echo "=== [$(elapsed) s] $*"; }
until_t() { local s=$(( $1 - $(elapsed) )); (( s < 5 )) && s=5; echo "$s"; }  # seconds left to deadline $1
package() {  # everything small in one archive (no checkpoints), re-made after each stage
  tar czf "$OUT/results.tgz.part" -C "$WORK" --exclude='*.ckpt' --exclude='site' --exclude='mnist' \
    --exclude='cache' . 2>/dev/null && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

# ---------------------------------------------------------------- settings (SMOKE=1: tiny, on CPU)
if [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu; SITE="$WORK/site"; N_JOBS=2
  SWEEP_SCALE=(trainer.accelerator=cpu model=unet_tiny data.batch_size=16 trainer.limit_val_batches=1
               callbacks.sample_grid.per_class=1 callbacks.sample_grid.num_steps=2)
  STEPS_A=${STEPS_A:-3}; GRID_A=(callbacks.ema.decay=0.99,0.995 condition.drop_prob=0.1)
  EVAL_N=256; GUIDANCE="[2.0,3.0]"; GUIDANCE_B="[2.0]"; EVAL_EXTRA=(steps=2)
  GPU_TRAIN=(trainer.accelerator=cpu trainer.precision=32-true module.compile=false model=unet_tiny
             trainer.max_steps=3 data.batch_size=16 trainer.limit_val_batches=1 callbacks.sample_grid.per_class=1
             callbacks.sample_grid.num_steps=2)
  BENCH=(--device cpu --batch 8 --rounds 1 --steps 1 --warmup 1)
  LOOP=(--device cpu --steps 2 --warmup 1 --rounds 1 --data-batches 4 model=unet_tiny data.batch_size=16)
  SAMPLING=(--device cpu --n 8 --batch-size 8 --quality off)
  BENCH_COMPILE=${SMOKE_COMPILE:-0}
else
  DEVICE=cuda; SITE=/tmp/site; N_JOBS=${N_JOBS:-2}
  SWEEP_SCALE=()
  STEPS_A=${STEPS_A:-2300}
  read -r -a GRID_A <<< "${GRID_A:-seed=0,1}"
  EVAL_N=5000; GUIDANCE=${GUIDANCE:-"[1.4,1.5,1.6,1.7]"}; GUIDANCE_B=${GUIDANCE_B:-"[1.25,1.5,2.0,2.5]"}
  EVAL_EXTRA=(batch_size=2500)
  GPU_TRAIN=(trainer.max_steps=${GPU_STEPS:-2500})
  BENCH=(--device cuda --precision bf16 --batch 256 --rounds 3 --steps 10 --warmup 3)
  LOOP=(--device cuda --precision bf16 --steps 30 --rounds 3 experiment=mnist_gpu)
  SAMPLING=(--device cuda --precision bf16 --n 1000 --batch-size 1000)
  BENCH_COMPILE=1
fi
# Deadlines (seconds from the start): sweep training; sweep evals and B; the benchmarks end at BUDGET.
T_SWEEP=${T_SWEEP:-$(( BUDGET * 50 / 100 ))}; T_EVAL=${T_EVAL:-$(( BUDGET * 85 / 100 ))}

# ---------------------------------------------------------------- setup
stage "setup (SMOKE=$SMOKE, STAGES=$STAGES, budget ${BUDGET} s)"
if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl \
  || { echo "FATAL: wheel install failed"; exit 1; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DLAB_DATA_DIR="$WORK/mnist" DLAB_CACHE_DIR="$WORK/cache"
mkdir -p "$DLAB_DATA_DIR/MNIST/raw" "$DLAB_CACHE_DIR"
for f in .gpu/mnist/*.gz; do gunzip -c "$f" > "$DLAB_DATA_DIR/MNIST/raw/$(basename "$f" .gz)"; done
cp -r .gpu/cache/. "$DLAB_CACHE_DIR/"
"$PY" - <<'EOF' || { echo "FATAL: imports failed"; exit 1; }
import torch, lightning, torchmetrics, hydra, omegaconf, diffusers
print(f"python ok: torch {torch.__version__} cuda={torch.cuda.is_available()} lightning {lightning.__version__} "
      f"torchmetrics {torchmetrics.__version__} hydra {hydra.__version__} omegaconf {omegaconf.__version__} "
      f"diffusers {diffusers.__version__}")
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
EOF
[[ -f "$DLAB_CACHE_DIR/evaluator/classifier.pt" ]] || { echo "FATAL: no evaluator in .gpu/cache"; exit 1; }
stage "setup done"

# ---------------------------------------------------------------- helpers
# dlab-train without installing the project. Not `python -m diffusion_lab.train`: the joblib launcher
# pickles the task function, and one defined in __main__ goes by value, dragging torch modules along.
TRAIN=("$PY" -c "from diffusion_lab.train import main; main()")
# Every sweep job: fp32 on the GPU, one validation (loss, sample grid, checkpoint) at the end.
COMMON=(trainer=gpu trainer.precision=32-true 'trainer.val_check_interval=${trainer.max_steps}'
        callbacks.rich_progress_bar=null callbacks.rich_model_summary=null hydra/launcher=joblib)
sweep() {  # sweep <name> <n_jobs> <overrides...>: one `dlab-train -m` into $WORK/sweep_<name>
  local name=$1 n=$2; shift 2
  echo "  [$(elapsed) s] sweep $name: $*"
  timeout -k 20 "$(until_t "$T_SWEEP")" "${TRAIN[@]}" -m "${COMMON[@]}" hydra.launcher.n_jobs="$n" \
    "${SWEEP_SCALE[@]}" "$@" hydra.sweep.dir="$WORK/sweep_$name" > "$WORK/sweep_$name.log" 2>&1
  local rc=$?
  echo "  [$(elapsed) s] sweep $name exit $rc ($(ls "$WORK/sweep_$name"/*/metrics.json 2>/dev/null | wc -l) jobs finished)"
  (( rc == 0 )) || grep -E "Error|error" "$WORK/sweep_$name.log" | tail -3
}
EVAL_PIDS=()
declare -A EVAL_STARTED=()
EVAL_PAR=${EVAL_PAR:-2}          # dlab-evals at once (~10-25 s each on the H200)
evaluate() {  # evaluate <run folder> <out folder> <guidance> <deadline>: dlab-eval, one line of result
  timeout -k 10 "$(until_t "$4")" "$PY" -m diffusion_lab.evaluate ckpt_path="$1" out="$2" n="$EVAL_N" \
    guidance="$3" 'steps_sweep.samplers=[]' device="$DEVICE" "${EVAL_EXTRA[@]}" > "$1/eval.log" 2>&1
  local rc=$?
  echo "  [$(elapsed) s] eval $1 exit $rc: $(grep -E 'guidance [0-9.]+:' "$1/eval.log" | sed -E 's/.*guidance/g/' | tr '\n' ' ')"
  (( rc == 0 )) || tail -3 "$1/eval.log"
}
running_evals() { local n=0 p; for p in "${EVAL_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo "$n"; }
scorable_jobs() {  # sweep jobs with a checkpoint: finished, or stopped by the deadline (interrupted.ckpt)
  local d
  for d in "$WORK"/sweep_*/*/; do compgen -G "$d/checkpoints/*.ckpt" > /dev/null && echo "${d%/}"; done
}
pump_evals() {  # start dlab-eval on each scorable, not yet evaluated job (at most EVAL_PAR at once)
  local d
  for d in $(scorable_jobs); do
    [[ -n "${EVAL_STARTED[$d]:-}" ]] && continue
    (( $(running_evals) >= EVAL_PAR )) && return
    EVAL_STARTED[$d]=1
    evaluate "$d" "$d/eval" "$GUIDANCE" "$T_EVAL" &
    EVAL_PIDS+=($!)
  done
}

# ---------------------------------------------------------------- A. recipe sweep, then B while A's jobs are scored
if [[ "$STAGES" == *A* ]]; then
stage "A. recipe sweep (fp32, ${N_JOBS} jobs at once): ${GRID_A[*]}"
# The CPU recipe (mnist_cpu: concat_embed, batch 64, lr 1e-3) at STEPS_A steps over GRID_A; fp32 so that the
# quality transfers to the CPU run with the same steps and batch.
sweep a "$N_JOBS" trainer.max_steps="$STEPS_A" "${GRID_A[@]}"
stage "A. sweep done; scoring its jobs (dlab-eval N=$EVAL_N guidance=$GUIDANCE, $EVAL_PAR at a time) beside B"
(
  while (( $(elapsed) < T_EVAL )); do
    pump_evals
    (( $(running_evals) == 0 )) && (( $(scorable_jobs | wc -l) <= ${#EVAL_STARTED[@]} )) && break
    sleep 2
  done
  for p in "${EVAL_PIDS[@]}"; do wait "$p"; done
) &
PID_EVAL_A=$!
fi

# ---------------------------------------------------------------- B. mnist_gpu: bf16-mixed, batch 256, compile
if [[ "$STAGES" == *B* ]]; then
stage "B. experiment=mnist_gpu ${GPU_TRAIN[*]}"
# A SIGTERM is honoured after the current step; in the final validation (compiled sampling) that can
# take tens of seconds, so the kill comes 60 s after it (20 s lost the 2026-11-27 run's checkpoint).
t=$(date +%s)
timeout -k 60 "$(until_t $(( T_EVAL - 90 )))" "${TRAIN[@]}" experiment=mnist_gpu "${GPU_TRAIN[@]}" \
  'trainer.val_check_interval=${trainer.max_steps}' callbacks.rich_progress_bar=null out="$WORK/mnist_gpu" \
  > "$WORK/mnist_gpu.log" 2>&1
rc=$?
echo "  mnist_gpu train exit $rc in $(( $(date +%s) - t )) s"; grep -E "final metrics|rror" "$WORK/mnist_gpu.log" | tail -3
if [[ -f "$WORK/mnist_gpu/metrics.json" ]]; then
  evaluate "$WORK/mnist_gpu" "$WORK/mnist_gpu/eval" "$GUIDANCE_B" "$T_EVAL"
  cp "$WORK/mnist_gpu/eval/eval.json" "$OUT/mnist_gpu_eval.json" 2>/dev/null
fi
stage "B. done"
fi

if [[ -n "${PID_EVAL_A:-}" ]]; then
  wait "$PID_EVAL_A"
  stage "A. summary and dlab-report"
  "$PY" benchmarks/gpu_summary.py "$WORK"/sweep_a $SUMMARY_ARGS --out "$OUT/recipes.md" > /dev/null && cat "$OUT/recipes.md"
  timeout 60 "$PY" -m diffusion_lab.report sweep="$WORK/sweep_a" out="$WORK/report_sweep_a" > "$WORK/report.log" 2>&1 \
    && cp "$WORK/report_sweep_a/report.md" "$OUT/report.md" || { echo "  report failed:"; tail -2 "$WORK/report.log"; }
fi
package

# ---------------------------------------------------------------- C. speed benchmarks
if [[ "$STAGES" == *C* ]]; then
bench() {  # bench <name> <script> <args...>: run a benchmark if its script exists
  local name=$1 script=$2; shift 2
  if [[ ! -f "$script" ]]; then echo "  (skip $name: no $script)"; return; fi
  if [[ -n "$BENCHES" && " $BENCHES " != *" $name "* ]]; then echo "  (skip $name: not in BENCHES)"; return; fi
  echo "  [$(elapsed) s] $name: $script $*"
  timeout -k 10 "$(until_t "$BUDGET")" "$PY" "$script" "$@" > "$WORK/bench/$name.log" 2>&1
  local rc=$?
  echo "  [$(elapsed) s] $name exit $rc"; tail -15 "$WORK/bench/$name.log"
}
stage "C. benchmarks"
mkdir -p "$WORK/bench"
# --- slot: Trainer.fit vs a plain PyTorch loop, and the DataModule alone (the mnist_gpu batch)
bench loop_overhead benchmarks/loop_overhead.py "${LOOP[@]}" --out "$WORK/bench/loop_overhead_$DEVICE.json"
# --- slot: sampling img/s with CFG (DDPM 1000, DDIM 50, DPM-Solver++ 10/20) on the best sweep job
CKPT=$("$PY" - "$OUT/recipes.json" "$WORK" <<'EOF2'
import json, math, sys
from pathlib import Path
rows = json.loads(Path(sys.argv[1]).read_text()) if Path(sys.argv[1]).is_file() else []
rows = [r for r in rows if r.get("fid_over_floor") is not None and math.isfinite(r["fid_over_floor"])]
best = min(rows, key=lambda r: (not r.get("meets_target"), r["fid_over_floor"]), default=None)
mnist_gpu = Path(sys.argv[2]) / "mnist_gpu" / "metrics.json"
print(Path(sys.argv[2]) / best["job"] if best else (mnist_gpu.parent if mnist_gpu.is_file() else ""))
EOF2
)
if [[ -n "$CKPT" ]]; then
  bench sampling benchmarks/sampling.py --ckpt "$CKPT" "${SAMPLING[@]}" --out "$WORK/bench/sampling_$DEVICE.json"
else
  echo "  (skip sampling: no trained checkpoint)"
fi
# --- slot: training throughput with torch.compile, then eager (ours vs diffusers), then the loop compiled
if (( BENCH_COMPILE )); then
  bench train_throughput_compiled benchmarks/train_throughput.py "${BENCH[@]}" --compile --methods concat_embed \
    --out "$WORK/bench/train_throughput_${DEVICE}_compiled.json"
fi
bench train_throughput benchmarks/train_throughput.py "${BENCH[@]}" --out "$WORK/bench/train_throughput_$DEVICE.json"
if (( BENCH_COMPILE )); then
  bench loop_overhead_compiled benchmarks/loop_overhead.py "${LOOP[@]}" --compile \
    --out "$WORK/bench/loop_overhead_${DEVICE}_compiled.json"
fi
fi
package
stage "all done"
