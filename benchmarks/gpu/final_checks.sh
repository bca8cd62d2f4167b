#!/usr/bin/env bash
# One device call: host overhead profile, the fp32 benchmark row (both fp32 precisions), the real-shape check of
# the chunked engine, the CUDA compile/opcheck suite, and the decode table with the tuned tiles.
# Output: $OUT/log.txt and $OUT/results.tgz. Needs .whl (fla-core, lightning-attn, and .whl/issue7 for pytest).
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/files"; L=$OUT/log.txt
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/issue7/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >>"$L"
echo "== host overhead" >>"$L"; timeout 90 python3 benchmarks/gpu/host_overhead.py >>"$L" 2>&1
for p in highest high; do
  echo "== fp32 row, float32_matmul_precision=$p" >>"$L"
  # (fla autotunes on its first call of a shape: allow ~2 minutes per row. In the session-2 run a 90 s limit
  # most likely cut both rows off before they printed: nothing came back.)
  timeout 170 python3 -c "import sys, runpy, torch; torch.set_float32_matmul_precision('$p'); sys.argv = ['bench_chunk.py', '--shapes', '4x8192x32x128:fp32', '--providers', 'ours', 'fla', '--out', '$OUT/files/fp32_$p']; runpy.run_path('benchmarks/bench_chunk.py', run_name='__main__')" 2>&1 | tail -6 >>"$L"
done
echo "== check" >>"$L"; timeout 200 python3 benchmarks/gpu/check_chunk.py >"$OUT/files/chunk_check_h100.log" 2>&1; tail -3 "$OUT/files/chunk_check_h100.log" >>"$L"
echo "== compile check" >>"$L"; timeout 170 python3 benchmarks/gpu/compile_check.py --out "$OUT/files" 2>&1 | tail -3 >>"$L"
echo "== decode" >>"$L"; (cd benchmarks && timeout 40 python3 bench_decode.py --out "$OUT/files") >>"$L" 2>&1
tar czf "$OUT/results.tgz" -C "$OUT" files && rm -rf "$OUT/files"
cat "$L"
