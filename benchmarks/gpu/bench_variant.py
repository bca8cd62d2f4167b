"""Run benchmarks/bench_chunk.py with engine constants overridden, to time variants of the shipped code in one
process each: ``python benchmarks/gpu/bench_variant.py chunk_scan.TMA_STORES=False -- --providers ours ...``.
Each override is ``module.NAME=python-literal`` or ``module.NAME:=expression`` (evaluated in the module's namespace,
with ``dataclasses`` importable by name), module under lightning_attention.engines.triton. E.g. two TMA stages:
``'chunk_scan.scan_config:=lambda*a,f=scan_config:dataclasses.replace(f(*a),tma_stages=2)'``."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import runpy
import sys


def main() -> None:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    for override in sys.argv[1:split]:
        target, value = override.split("=", 1)
        is_expression = target.endswith(":")
        module, name = target.rstrip(":").rsplit(".", 1)
        mod = importlib.import_module(f"lightning_attention.engines.triton.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"{module} has no {name}")
        namespace = {**vars(mod), "dataclasses": dataclasses}
        setattr(mod, name, eval(value, namespace) if is_expression else ast.literal_eval(value))
    sys.argv = ["bench_chunk.py", *sys.argv[split + 1 :]]
    runpy.run_path("benchmarks/bench_chunk.py", run_name="__main__")


if __name__ == "__main__":
    main()
