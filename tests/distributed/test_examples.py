"""The examples under torchrun on CPU (gloo), each bounded by a hard timeout.

examples/fsdp2_context_parallel.py: FSDP2 on a dp x cp mesh trains exactly as one process does (its --check:
first-step gradients, losses, final parameters against float64, by the library's tolerance rule).
examples/context_parallel.py: each rank's slice of a packed row matches the single-device op.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(nproc: int, script: str, *options: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU, whatever the machine has
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "examples" / script), *options,
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


@pytest.mark.parametrize(
    "nproc, options",
    [
        pytest.param(2, ["--cp", "2", "--shard", "all"], id="world2-dp1xcp2-shard-all"),
        pytest.param(4, ["--cp", "2"], id="world4-dp2xcp2-hsdp"),
    ],
)
def test_fsdp2_training_matches_one_process(nproc, options):
    run = _torchrun(nproc, "fsdp2_context_parallel.py", *options, "--check")
    assert "MATCHES single-process training" in run.stdout, run.stdout
    assert "step 2: loss" in run.stdout, run.stdout
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith("BAD")], run.stdout
    grads = [line for line in lines if line.startswith("ok  gradient (step 0) ")]
    params = [line for line in lines if line.startswith("ok  parameter (last step) ")]
    assert len(grads) == len(params) >= 10 and any(line.startswith("ok  loss per step") for line in lines), run.stdout


def test_op_example_matches_the_single_device_op():
    run = _torchrun(2, "context_parallel.py")
    number = r"([0-9.]+e[+-][0-9]+)"
    found = re.findall(rf"rank (\d): tokens .*? output {number}, final states {number}", run.stdout)
    assert sorted(rank for rank, _, _ in found) == ["0", "1"], run.stdout
    for _, output, final in found:
        # bf16 outputs: within two roundings of the single-device op (unit roundoff 2^-8); fp32 states tighter.
        assert float(output) < 2 * 2**-8 and float(final) < 1e-5, run.stdout
