#!/usr/bin/env bash
# One device call for issues 5 and 7: serving/recurrent GPU tests and benchmarks (step "serving"), and the
# torch.compile checks and eager-vs-compiled benchmark on CUDA (step "compile"). Each step has its own time
# limit so that one slow step cannot eat the call. Results: $OUT/log.txt and $OUT/results.tgz.
# pytest is not in the device image: its wheels travel in .whl/issue7 (carry .whl).
# Usage: benchmarks/gpu/serving_compile.sh [serving] [compile]
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/files"
L=$OUT/log.txt
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/issue7/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >>"$L" 2>&1
for step in "$@"; do
  case $step in
    serving)
      echo "== decode sweep" >>"$L"; (cd benchmarks && timeout 60 python3 bench_decode.py --sweep --out "$OUT/files") >>"$L" 2>&1
      echo "== serving tests" >>"$L"
      timeout 90 python3 -m pytest -q -p no:warnings -p no:cacheprovider tests/engines/triton/test_recurrent.py \
        tests/engines/triton/test_decode.py tests/test_serving.py 2>&1 | tail -30 >>"$L"
      echo "== recurrent vs chunked" >>"$L"; (cd benchmarks && timeout 70 python3 bench_recurrent.py --sweep --out "$OUT/files") >>"$L" 2>&1
      echo "== bf16 cache accuracy" >>"$L"; (cd benchmarks && timeout 25 python3 bench_decode.py --accuracy --device cuda --out "$OUT/files") >>"$L" 2>&1
      ;;
    compile)
      echo "== compile check" >>"$L"; timeout 300 python3 benchmarks/gpu/compile_check.py --out "$OUT/files" 2>&1 | tail -15 >>"$L"
      echo "== compile bench" >>"$L"; timeout 150 python3 benchmarks/bench_compile.py --device cuda --out "$OUT/files" >>"$L" 2>&1
      ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$OUT" files && rm -rf "$OUT/files"
cat "$L"
