"""examples/fsdp2_context_parallel.py under torchrun on CPU (gloo): FSDP2 on a dp x cp mesh trains exactly as one
process does (its --check: first-step gradients, losses, final parameters against float64, by the library's
tolerance rule). Bounded: a hard timeout on the whole launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "nproc, options",
    [
        pytest.param(2, ["--cp", "2", "--shard", "all"], id="world2-dp1xcp2-shard-all"),
        pytest.param(4, ["--cp", "2"], id="world4-dp2xcp2-hsdp"),
    ],
)
def test_fsdp2_training_matches_one_process(nproc, options):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU, whatever the machine has
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "examples" / "fsdp2_context_parallel.py"), *options, "--check",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "MATCHES single-process training" in run.stdout, output[-4000:]
    assert "step 2: loss" in run.stdout, output[-4000:]
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith("BAD")], run.stdout
    grads = [line for line in lines if line.startswith("ok  gradient (step 0) ")]
    params = [line for line in lines if line.startswith("ok  parameter (last step) ")]
    assert len(grads) == len(params) >= 10 and any(line.startswith("ok  loss per step") for line in lines), run.stdout
