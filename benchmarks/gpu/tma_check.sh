#!/usr/bin/env bash
# Device calls that decide whether the TMA path (chunk_scan.TMA) can be on: any of these steps, in order.
#   check   GPU tests with TMA on (incl. the fresh-process first backward) and check_chunk.py with TMA on, side by
#           side (compiles are CPU-bound)
#   bench   ours with TMA on and off (and fla with FLA=1) at the shapes it helps or hurts
#   variants  ours: the default against overridden engine constants (VARIANTS; bench_variant.py)
#   host    host_overhead.py with TMA on and off (host time per call, where eager columns are host-bound)
# e.g. `bash benchmarks/gpu/tma_check.sh check bench`. Output: $OUT/log.txt, $OUT/files.tgz.
# Needs .whl (fla-core; .whl/issue7 for pytest). check ~5-7 min (SHARDS=6), bench ~2 min (~5 with fla), host ~1 min.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/files"; L=$OUT/log.txt
SHAPES=${SHAPES:-4x8192x32x128 1x32768x8x128 8x4096x16x64}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl/issue7/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/src:$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >>"$L"
for MODE in "${@:-check}"; do
  case $MODE in
  check)  # TMA=${TMA:-1}: 1 also puts heads of 64 through TMA; "" checks the shipped default
    export LIGHTNING_ATTENTION_TMA=${TMA-1}
    timeout 300 python3 -m pytest -q -p no:cacheprovider --runslow -k "fresh_process" \
      tests/engines/triton/test_chunk.py >"$OUT/files/pytest_first_bwd.log" 2>&1
    # compiles are CPU-bound and serial within a process: SHARDS processes share the tests round-robin
    python3 -m pytest -q -p no:cacheprovider --runslow --collect-only tests/engines/triton/test_chunk.py \
      tests/engines/triton/test_chunk_state.py tests/engines/triton/test_common.py tests/test_serving.py \
      2>/dev/null | grep "::" >"$OUT/test_ids.txt"
    for ((s = 0; s < ${SHARDS:-6}; s++)); do
      awk -v n="${SHARDS:-6}" -v s=$s 'NR % n == s' "$OUT/test_ids.txt" >"$OUT/shard$s.txt"
      timeout 420 python3 -m pytest -q -p no:cacheprovider --runslow @"$OUT/shard$s.txt" \
        >"$OUT/files/pytest_tma$s.log" 2>&1 &
    done
    timeout 420 python3 benchmarks/gpu/check_chunk.py >"$OUT/files/check_tma.log" 2>&1 &
    wait
    unset LIGHTNING_ATTENTION_TMA
    { echo "== $(wc -l <"$OUT/test_ids.txt") tests in ${SHARDS:-6} shards"
      for f in "$OUT"/files/pytest_*.log; do echo "== ${f##*/}"; tail -3 "$f"; done; } >>"$L"
    rm -f "$OUT"/test_ids.txt "$OUT"/shard*.txt
    { echo "== check_chunk, TMA on: ok lines"; grep -c " ok$" "$OUT/files/check_tma.log"
      grep -v " ok$" "$OUT/files/check_tma.log" | tail -8; } >>"$L" ;;
  bench)
    for tma in 1 0; do
      echo "== bench, TMA=$tma" >>"$L"
      LIGHTNING_ATTENTION_TMA=$tma timeout 270 python3 benchmarks/bench_chunk.py --out "$OUT/files/tma$tma" \
        --providers ours $([ "$tma$FLA" = 11 ] && echo fla) --shapes $SHAPES 2>&1 | grep "^| [0-9]" >>"$L"
    done ;;
  variants)  # VARIANTS: space-separated override sets (";" between overrides; "default" for none)
    for v in ${VARIANTS:-default chunk.PAIRED_DKDV=False chunk_scan.TMA_HEAD_DIMS=()}; do
      echo "== bench, $v" >>"$L"
      timeout 200 python3 benchmarks/gpu/bench_variant.py $([ "$v" != default ] && echo "${v//;/ }") -- \
        --out "$OUT/files/variant" --providers ours --shapes $SHAPES 2>&1 | grep "^| [0-9].*ours" | sort -u >>"$L"
    done ;;
  host)
    for tma in 1 0; do
      echo "== host_overhead, TMA=$tma" >>"$L"
      LIGHTNING_ATTENTION_TMA=$tma timeout 120 python3 benchmarks/gpu/host_overhead.py 4x8192x32x128 \
        >"$OUT/files/host_tma$tma.log" 2>&1
      grep "do_bench" "$OUT/files/host_tma$tma.log" >>"$L"
    done ;;
  esac
done
tar czf "$OUT/files.tgz" -C "$OUT" files && rm -rf "$OUT/files"
cat "$L"
