import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
#: triton 3.6's interpreter fails on ``range(runtime_int)`` with NumPy 2.4 and later (CI pins numpy<2.4; a GPU
#: machine's image may not, and there the scripts' real runs are the benchmarks themselves).
INTERPRETER_WORKS = tuple(int(part) for part in numpy.__version__.split(".")[:2]) < (2, 4)


@pytest.fixture
def run_script():
    """``run_script(name, *args)``: benchmarks/<name> in a fresh Python (the Triton interpreter on), its exit code
    checked; returns the finished process."""

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        if not INTERPRETER_WORKS:
            pytest.skip(f"the Triton interpreter needs numpy<2.4, found {numpy.__version__}")
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
