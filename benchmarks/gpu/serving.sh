#!/usr/bin/env bash
# One device call for issue 21 (serving): the GPU tests of the serving path, then the serving benchmark with the
# decode tile sweep. About 4 minutes on one H200. Output: $OUT/log.txt and $OUT/results/<card>/serving.{md,json}
# (copy that folder to benchmarks/results/). pytest is not in the device image: its wheels travel in .whl/issue7.
# Usage: benchmarks/gpu/serving.sh
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; L=$OUT/log.txt
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/issue7/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >>"$L" 2>&1
echo "== serving tests (CUDA)" >>"$L"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/engines/triton/test_decode.py tests/test_serving.py \
  tests/engines/triton/test_recurrent.py "tests/test_compile.py::test_opcheck_serving_ops" \
  "tests/test_compile.py::test_compile_serving_ops_update_the_cache" "tests/test_compile.py::test_serving_ops_ignore_autocast" \
  2>&1 | tail -25 >>"$L"
echo "== serving benchmark + sweep" >>"$L"
timeout 250 python3 benchmarks/bench_decode.py --sweep --out "$OUT/results" >>"$L" 2>&1
echo "== exit $?" >>"$L"
cat "$L"
