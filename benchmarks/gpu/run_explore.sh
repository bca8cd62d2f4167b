#!/usr/bin/env bash
# Device call for the chunked engine's design exploration: explore_chunk.py's steps ("$@"), then (with NCU=1)
# Nsight Compute on one forward + backward at the main shape. Output: $OUT/explore.log, $OUT/ncu.txt.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/explore.log"
timeout ${EXPLORE_TIMEOUT:-420} python3 benchmarks/gpu/explore_chunk.py "$@" 2>&1 | tee -a "$OUT/explore.log"
[ "${NCU:-0}" = 1 ] || exit 0
timeout 120 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section MemoryWorkloadAnalysis --section WarpStateStats -k 'regex:_scan_kernel|_dkdv_kernel' -c 3 \
  python3 benchmarks/gpu/explore_chunk.py --ncu > "$OUT/ncu.txt" 2>&1
grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Dynamic Shared|Stall|dram__|Compute \(SM\)|Block Limit|Waves" "$OUT/ncu.txt" | head -80
