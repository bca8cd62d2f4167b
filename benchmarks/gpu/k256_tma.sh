#!/usr/bin/env bash
# One device call: benchmarks/gpu/k256_tma.py over the configurations compiled spill-free offline (and the
# shipped ones). Output: $OUT/log.txt. About 3 minutes.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
for cfg in "64 8 2 pointer" "64 8 2 2" "32 8 2 2" "32 4 2 2" "32 8 2 3" "32 8 2 pointer"; do
  timeout 100 python3 benchmarks/gpu/k256_tma.py $cfg >>"$OUT/log.txt" 2>&1 || echo "$cfg: failed (rc $?)" >>"$OUT/log.txt"
done
cat "$OUT/log.txt"
