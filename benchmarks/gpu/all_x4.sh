#!/usr/bin/env bash
# One device call on a 4-GPU host: the single-GPU checks run side by side (one GPU each), then the
# context-parallel scaling run uses all four. Results and logs go to $OUT.
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/issue7/*.whl >/dev/null 2>&1; then  # pytest and its needs, absent from the device image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/issue7/*.whl
fi
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=index,name,driver_version --format=csv | tee "$OUT/gpu.txt"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider --runslow \
  tests/engines/triton/test_chunk.py > "$OUT/chunk_pytest.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout -k 5 150 python3 benchmarks/gpu/check_chunk.py > "$OUT/chunk_check.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 timeout -k 5 150 python3 benchmarks/gpu/compile_check.py --out "$OUT" > "$OUT/compile.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 timeout -k 5 150 python3 benchmarks/bench_decode.py --out "$OUT" > "$OUT/decode.log" 2>&1 &
wait
for f in chunk_pytest chunk_check compile decode; do echo "== $f"; tail -n 12 "$OUT/$f.log"; done
declare -A LIMIT=([1]=90 [2]=70 [4]=70)
for P in 1 2 4; do
  timeout -k 5 "${LIMIT[$P]}" python3 -m torch.distributed.run --standalone --nproc_per_node="$P" \
    benchmarks/bench_context_parallel.py --out "$OUT/cp_P$P.json" --tokens 131072 524288 1048576 \
    --no-decay-tokens --iters 3 > "$OUT/cp_P$P.log" 2>&1
  echo "P=$P rc=$?"; tail -n 4 "$OUT/cp_P$P.log"
done
python3 benchmarks/bench_context_parallel.py --report "$OUT" 2>&1 | tail -n 30
