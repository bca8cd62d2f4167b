"""Run benchmarks/bench_chunk.py with engine constants overridden, to time variants of the shipped code in one
process each: ``python benchmarks/gpu/bench_variant.py chunk_scan.TMA_STORES=False -- --providers ours ...``.
Each override is ``module.NAME=python-literal``, module under lightning_attention.engines.triton."""

from __future__ import annotations

import ast
import importlib
import runpy
import sys


def main() -> None:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    for override in sys.argv[1:split]:
        target, value = override.split("=", 1)
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(f"lightning_attention.engines.triton.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"{module} has no {name}")
        setattr(mod, name, ast.literal_eval(value))
    sys.argv = ["bench_chunk.py", *sys.argv[split + 1 :]]
    runpy.run_path("benchmarks/bench_chunk.py", run_name="__main__")


if __name__ == "__main__":
    main()
