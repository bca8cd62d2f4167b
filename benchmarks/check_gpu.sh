#!/usr/bin/env bash
# The GPU check, run on a CUDA machine after every change to a kernel: the whole test suite with the slow tests but
# the long CPU-only ones below (the Triton tests run on the GPU there; pytest-xdist spreads them over processes,
# since Triton's compiles are CPU-bound), then check_chunk.py's real-shape cases against float64. Exits non-zero on
# any failure.
# Writes LOG_DIR/check_gpu.md (summary: card, versions, counts, failures) and LOG_DIR/pytest.log, check_chunk.log.
#
#   bash benchmarks/check_gpu.sh [LOG_DIR [TEST_PATH ...]]   (defaults: benchmarks/results/<card>, tests)
#
# TEST_PATHs split the suite over several calls where one call has a time limit (CHECK_CHUNK=0 skips check_chunk.py).
# On an H200 with 16 cores (WORKERS=15) the split tests/engines | tests/test_*.py | tests/*/ (the other folders) fits
# calls of 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
card=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
# Results folder per card: "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100.
dir=${1:-benchmarks/results/$(python3 -m lightning_attention.bench.environment --device cuda --folder)}
mkdir -p "$dir"
shift $(( $# > 0 ? 1 : 0 ))
paths=("${@:-tests}")
workers=${WORKERS:-8}
# The suite's long tests that never touch the GPU (the torch engine on CPU tensors; CI runs them on every change):
# left out here, where the device's time is short.
cpu_only=(
  tests/test_ops_properties.py::test_torch_engine_matches_reference
  tests/test_ops.py::test_gradcheck
  tests/test_ops_reliability.py::test_sequence_of_262144_tokens_is_finite_and_exact
  "tests/test_serving_soak.py::test_serving_soak[torch-"
)
deselect=()
for test in "${cpu_only[@]}"; do deselect+=(--deselect "$test"); done
start=$(date +%s)
# -v: every result is logged with its name as it comes, so that a run cut by the time limit still names its
# failures (xdist's summary comes only at the end); each line is stamped with the second it came, from which the
# summary estimates the slowest tests (a worker's time between its results) even for a cut run.
timeout "${PYTEST_TIMEOUT:-900}" python3 -m pytest -v -p no:cacheprovider --runslow -n "$workers" "${deselect[@]}" \
  "${paths[@]}" 2>&1 | while IFS= read -r line; do printf '%(%s)T %s\n' -1 "$line"; done >"$dir/pytest.log"
pytest_rc=${PIPESTATUS[0]}
check_rc=0
if [ "${CHECK_CHUNK:-1}" != 0 ]; then
  timeout "${CHECK_TIMEOUT:-300}" python3 benchmarks/check_chunk.py >"$dir/check_chunk.log" 2>&1
  check_rc=$?
fi
summary=$(grep -E '^[0-9]+ =+ .*(passed|failed|error)' "$dir/pytest.log" | tail -1 | cut -d' ' -f2-)
{
  echo "# GPU check: $card"
  echo
  python3 -m lightning_attention.bench.environment --device cuda  # card | driver | torch | triton | python
  echo
  echo "\`bash benchmarks/check_gpu.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(( $(date +%s) - start )) s"
  echo
  echo "- pytest (${paths[*]}, --runslow, $workers workers, without ${cpu_only[*]}): ${summary:-no summary (stopped by the time limit)} (exit $pytest_rc)"
  grep -E " (FAILED|ERROR) " "$dir/pytest.log" | sed -E 's/^[0-9]+ //; s/^\[gw[0-9]+\] \[ *[0-9]+%\] //; s/^/  - /' | sort -u
  echo "- slowest tests (seconds between a worker's results; the first result of each worker counts from the start):"
  python3 - "$dir/pytest.log" "$start" <<'PY'
import re, sys
last, took = {}, []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(\d+) \[(gw\d+)\] \[ *\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
    if m:
        when, worker = int(m.group(1)), m.group(2)
        took.append((when - last.get(worker, int(sys.argv[2])), m.group(4)))
        last[worker] = when
for seconds, test in sorted(took, reverse=True)[:15]:
    print(f"  - {seconds} s {test}")
PY
  if [ "${CHECK_CHUNK:-1}" != 0 ]; then
    echo "- check_chunk.py: $(grep -c ' ok$' "$dir/check_chunk.log") checks ok, $(tail -1 "$dir/check_chunk.log") (exit $check_rc)"
    grep -v " ok$" "$dir/check_chunk.log" | grep -E "FAIL" | sed 's/^/  - /'
  fi
} >"$dir/check_gpu.md"
cat "$dir/check_gpu.md"
[ "$pytest_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
