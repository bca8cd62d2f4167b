#!/usr/bin/env bash
# One device call that decides whether the TMA path (chunk_scan.TMA) can be turned on: the GPU tests with it on
# (including the fresh-process first backward that failed in session 3), the real-shape check, and the benchmark
# of ours (TMA on and off) against fla at the shapes it helps or hurts. Output: $OUT/log.txt, $OUT/files.tgz.
# Needs .whl (fla-core; .whl/issue7 for pytest). About 8 minutes.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/files"; L=$OUT/log.txt
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl/issue7/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >>"$L"
echo "== pytest, TMA on" >>"$L"
LIGHTNING_ATTENTION_TMA=1 timeout 240 python3 -m pytest -q -p no:cacheprovider --runslow \
  tests/engines/triton/test_chunk.py tests/test_serving.py 2>&1 | tail -4 >>"$L"
echo "== check_chunk, TMA on" >>"$L"
LIGHTNING_ATTENTION_TMA=1 timeout 200 python3 benchmarks/gpu/check_chunk.py >"$OUT/files/check_tma.log" 2>&1
tail -2 "$OUT/files/check_tma.log" >>"$L"
for tma in 1 0; do
  echo "== bench, TMA=$tma" >>"$L"
  LIGHTNING_ATTENTION_TMA=$tma timeout 150 python3 benchmarks/bench_chunk.py --out "$OUT/files/tma$tma" \
    --providers ours $([ $tma = 1 ] && echo fla) --shapes 4x8192x32x128 1x32768x8x128 8x4096x16x64 2>&1 | grep "^| [0-9]" >>"$L"
done
tar czf "$OUT/files.tgz" -C "$OUT" files && rm -rf "$OUT/files"
cat "$L"
