#!/usr/bin/env bash
# Everything the device run of the chunked engine does, in one call: GPU tests, real-shape checks, tuning
# sweep (optional), benchmark. Logs and results go to $OUT (or ./gpu_out). Usage: run_chunk.sh [tune] [bench]
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    test)  python3 -m pytest -q -p no:cacheprovider --runslow tests/engines/triton/test_chunk.py 2>&1 | tail -25 | tee "$OUT/pytest.log" ;;
    check) python3 benchmarks/gpu/check_chunk.py 2>&1 | tee "$OUT/check.log" ;;
    tune)  python3 benchmarks/gpu/tune_chunk.py 2>&1 | tee "$OUT/tune.log" ;;
    bench) python3 benchmarks/bench_chunk.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
  esac
done
