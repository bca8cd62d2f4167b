"""``python -m lightning_attention {demo,check,bench,tune}``.

Each subcommand lives in ``lightning_attention/cli/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); they are imported only when chosen, so ``check`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "train a tiny Lightning LM on CPU/GPU, evaluate it, generate with the decode path",
    "check": "run every available backend against the float64 reference and print a table",
    "bench": "benchmark the ops on the available device against the bandwidth floor",
    "tune": "measure the Triton kernels' launch configurations on this GPU and write its launch table",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_attention", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"lightning_attention.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return importlib.import_module(f"lightning_attention.cli.{args.command}").run(args)


if __name__ == "__main__":
    sys.exit(main())
