#!/usr/bin/env bash
# Time (and optionally check) whole source trees against each other in one device call, for changes that
# bench_variant.py's constant overrides cannot express (kernel code). Each argument is a folder holding a
# patched copy of src/ (git-excluded, passed in the device call's carry), e.g. variants/round4 ->
# variants/round4/src/lightning_attention. SHAPES: bench_chunk.py shapes; CHECK: Python run after
# `import torch, check_chunk as c` (benchmarks/gpu/check_chunk.py) against each tree, e.g.
#   CHECK='c.check("fp32 TF32", 4, 8192, 8, 128, 128, torch.float32, fp32_precision="high")'
# Output: $OUT/log.txt.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; L=$OUT/log.txt
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >>"$L"
for tree in "$@"; do
  echo "== $tree" >>"$L"
  PYTHONPATH=$tree/src:$PWD:/tmp/site timeout 200 python3 benchmarks/bench_chunk.py --out "" --providers ours \
    --shapes $SHAPES 2>&1 | grep "^| [0-9]" >>"$L"
  if [ -n "$CHECK" ]; then
    PYTHONPATH=$tree/src:$PWD/benchmarks/gpu:/tmp/site timeout 200 python3 -c "import torch, check_chunk as c
$CHECK" >>"$L" 2>&1
  fi
done
cat "$L"
