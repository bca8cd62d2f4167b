import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def run_script():
    """``run_script(name, *args)``: benchmarks/<name> in a fresh Python (the Triton interpreter on), its exit code
    checked; returns the finished process."""

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
