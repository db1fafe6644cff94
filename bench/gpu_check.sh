#!/usr/bin/env bash
# Every GPU-only path of sslkit in one run on one GPU (at most 8 minutes), one table at the end.
#
#   bash bench/gpu_check.sh [--dry-run] [--python PY] [--work DIR] [--quick]
#
# Checks, each under its own time limit (seconds in brackets; a check past it is reported, the rest go on):
#   demo        sslkit pretrain demo, 300 steps, train.precision=bf16 (every training check asks for bf16) [50]
#   demo+compile the same, train.compile=true (torch.compile)                                    [100]
#   ccrl        configs/ccrl.yaml as published (preact ResNet-18, 32 px, batch 1024, bf16), 200 steps [50]
#   ccrl-r50    configs/ccrl.yaml, model.backbone=resnet50, 224-pixel crops, data.batch_size=128, bf16 [50]
#   ccrl-r50+cl the same with model.channels_last=true                                             [50]
#   train_step  bench/train_step.py --device cuda: sslkit CCRL/MoCo step against lightly's          [50]
#   views       bench/views.py --device cuda: BatchViews on the GPU against the PIL back-end       [30]
#   faiss       bench/faiss_devices.py: sslkit k-means and kNN, faiss GPU against the CPU path, 1M x 128 [80]
# Training checks report pairs/s (median of the logged intervals after the first), data_wait_share
# and peak GPU memory (metrics.jsonl's mem_peak_gb); the bench scripts their last line (ratio=...).
#
# --dry-run: no GPU needed, nothing trained. Every command is parsed as it would be (bench/argcheck.py:
# the bench scripts up to their parse_args, sslkit's command line and recipe validation) and every file
# the checks need must exist; exit status 1 if anything does not. CI runs it (tests/test_gpu_check.py).
# --python: the interpreter that has torch with CUDA and sslkit's requirements (default: python3, or
# the repository's .venv when it exists). sslkit is imported from this checkout (PYTHONPATH).
# --quick: a tenth of the steps (a smoke test of the script itself).
# Results: the table on stdout, each check's log and results.jsonl under --work (default a temporary
# folder). Missing packages (faiss GPU build, lightly, webdataset) are named in the table, not fatal.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
QUICK=0
WORK=""
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --python) PY="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)." >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ -z "$WORK" ]; then
  if [ "$DRY" = 1 ]; then WORK="${TMPDIR:-/tmp}/sslkit-gpu-check"; else WORK="$(mktemp -d -t sslkit-gpu-check-XXXXXX)"; fi
fi
RESULTS="$WORK/results.jsonl"
cd "$ROOT" || exit 1

steps() { if [ "$QUICK" = 1 ]; then echo $(( $1 / 10 )); else echo "$1"; fi; }
DEMO_STEPS=$(steps 300)
CCRL_STEPS=$(steps 200)
COMMON=(tracker.name=none train.eval_every=0 train.log_every=20 train.precision=bf16 data.workers=8)

BIG_SHARDS='
import os, sys
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.synthetic import SyntheticSource
run_source(SyntheticSource(num_samples=3072, size=224, seed=3, chunk=64), sys.argv[1],
           workers=len(os.sched_getaffinity(0)), shard_size=512, progress=False)
'

# name | limit (s) | kind (train: read metrics.jsonl of RUN; bench: the last line) | command...
CHECKS=()
add() { CHECKS+=("$(printf '%s\x1f' "$@")"); }
add demo 50 train -m sslkit pretrain demo "data.shards=$WORK/demo-shards" "run.dir=$WORK/run-demo" \
  "train.max_steps=$DEMO_STEPS" "train.ckpt_every=$DEMO_STEPS" "${COMMON[@]}"
add demo+compile 100 train -m sslkit pretrain demo "data.shards=$WORK/demo-shards" "run.dir=$WORK/run-compile" \
  "train.max_steps=$DEMO_STEPS" "train.ckpt_every=$DEMO_STEPS" train.compile=true "${COMMON[@]}"
add ccrl 50 train -m sslkit pretrain configs/ccrl.yaml "data.shards=$WORK/demo-shards" "run.dir=$WORK/run-ccrl" \
  "train.max_steps=$CCRL_STEPS" "train.ckpt_every=$CCRL_STEPS" optim.warmup_steps=20 method.queue_size=16384 \
  "${COMMON[@]}"
add ccrl-r50 50 train -m sslkit pretrain configs/ccrl.yaml "data.shards=$WORK/big-shards" "run.dir=$WORK/run-r50" \
  "train.max_steps=$CCRL_STEPS" "train.ckpt_every=$CCRL_STEPS" model.backbone=resnet50 model.backbone_kwargs={} data.size=224 \
  data.batch_size=128 optim.warmup_steps=20 method.queue_size=16384 "${COMMON[@]}"
add ccrl-r50+cl 50 train -m sslkit pretrain configs/ccrl.yaml "data.shards=$WORK/big-shards" "run.dir=$WORK/run-r50cl" \
  "train.max_steps=$CCRL_STEPS" "train.ckpt_every=$CCRL_STEPS" model.backbone=resnet50 model.backbone_kwargs={} data.size=224 \
  data.batch_size=128 optim.warmup_steps=20 method.queue_size=16384 model.channels_last=true \
  "${COMMON[@]}"
add train_step 50 bench bench/train_step.py --device cuda --peer-amp --no-memory
add views 30 bench bench/views.py --device cuda --batches 40
add faiss 80 bench bench/faiss_devices.py --n 1000000 --queries 100000

# ------------------------------------------------------------------ dry run
if [ "$DRY" = 1 ]; then
  bad=0
  for f in configs/ccrl.yaml sslkit/configs/demo.yaml bench/train_step.py bench/views.py bench/faiss_devices.py \
           bench/kmeans.py bench/argcheck.py bench/gpu_check_report.py; do
    [ -f "$f" ] || { echo "missing: $f"; bad=1; }
  done
  for entry in "${CHECKS[@]}"; do
    IFS=$'\x1f' read -r -a parts <<< "$entry"
    name="${parts[0]}"
    if ! out=$("$PY" bench/argcheck.py "${parts[@]:3}" 2>&1); then
      echo "FAILED $name: $(echo "$out" | tail -3)"; bad=1
    else
      echo "parsed $name: ${parts[*]:3}"
    fi
  done
  [ "$bad" = 0 ] && echo "dry run: every command parses and every file exists." || echo "dry run: FAILED."
  exit "$bad"
fi

# ------------------------------------------------------------------ the checks
mkdir -p "$WORK"
: > "$RESULTS"
"$PY" - <<'EOF' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check.sh: torch sees no GPU (torch %s); run it on a machine with one, or --dry-run." % torch.__version__)
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "work folder: $WORK"
start_all=$(date +%s)
"$PY" -m sslkit shard synthetic --out "$WORK/demo-shards" --num 20000 --seed 0 > "$WORK/shard-demo.log" 2>&1 \
  || echo "making the demo shards failed: $WORK/shard-demo.log"
# 224-pixel crops render slowly (about 20 a second per core): the sharding runner, one worker per core.
"$PY" -c "$BIG_SHARDS" "$WORK/big-shards" > "$WORK/shard-big.log" 2>&1 \
  || echo "making the 224-pixel shards failed: $WORK/shard-big.log"

for entry in "${CHECKS[@]}"; do
  IFS=$'\x1f' read -r -a parts <<< "$entry"
  name="${parts[0]}"; limit="${parts[1]}"; kind="${parts[2]}"; cmd=("${parts[@]:3}")
  log="$WORK/$name.log"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" "${cmd[@]}" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  "$PY" bench/gpu_check_report.py row "$name" "$kind" "$rc" "$secs" "$log" -- "${cmd[@]}" >> "$RESULTS"
done

"$PY" bench/gpu_check_report.py table "$RESULTS" "$start_all"
status=$?
echo "logs and results.jsonl: $WORK"
exit $status
