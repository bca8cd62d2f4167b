#!/usr/bin/env bash
# Context parallelism on one host: correctness at T=64k (one sequence, packed documents, and packed documents with
# per-token gates), then forward+backward scaling at T = 128k, 512k, 1M, 4M (B=1, H=32, D=128, bf16), 512k without
# decay, 512k with per-token gates, and packed documents of 8k-64k tokens at 512k and 1M, on 1, 2 and 4 GPUs (NCCL,
# one torchrun launch per GPU count, as many as the host has), then a markdown report.
# Results: $OUT (default ./gpu_out): cp_P{1,2,4}.json, context_parallel.log, context_parallel.md, and the report
# copied to benchmarks/results/<card>x<GPUs>/context_parallel.md (e.g. h200x4: the card and the most GPUs run).
# Usage, from the repository root:  bash benchmarks/context_parallel.sh      (under 10 minutes)
set -o pipefail
# NVLink multicast stays off (it can take a shared host's GPUs out of service): NCCL, PyTorch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/context_parallel.log"
START=$SECONDS

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
"$PY" -m lightning_attention.bench.environment 2>&1 | tee -a "$LOG"  # card, driver, torch, triton, python

# The local-state Triton kernel on this GPU against float64 (seconds; the CP tests themselves are CPU/gloo).
timeout -k 5 60 "$PY" -m pytest -q -p no:cacheprovider tests/distributed/test_local_state.py 2>&1 | tail -15 \
  | tee -a "$LOG"

# Per-launch limits (seconds) keep the whole run under 10 minutes even if one launch hangs; the first launch
# also compiles the Triton kernels (cached on disk for the next ones).
declare -A LIMIT=([1]=230 [2]=150 [4]=150)
for P in 1 2 4; do
  if [ "$P" -gt "$NGPU" ]; then
    echo "skip P=$P: only $NGPU GPU(s)" | tee -a "$LOG"
    continue
  fi
  echo "=== P=$P (t=$((SECONDS - START))s) ===" | tee -a "$LOG"
  timeout -k 10 "${LIMIT[$P]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$P" \
    benchmarks/bench_context_parallel.py --out "$OUT/cp_P$P.json" 2>&1 | tee -a "$LOG"
  rc=$?
  [ "$rc" -eq 0 ] || echo "launch P=$P exited with $rc (124: hit its ${LIMIT[$P]}s limit); partial results kept" \
    | tee -a "$LOG"
done
"$PY" benchmarks/bench_context_parallel.py --report "$OUT" --results benchmarks/results 2>&1 | tee -a "$LOG"
echo "total $((SECONDS - START))s" | tee -a "$LOG"
