"""What every benchmark records with its numbers, and where it writes them.

- :func:`environment`: the stamp of a result: card, driver, torch, triton and Python versions.
- :func:`copy_bandwidth`: the device's measured copy bandwidth, the denominator of every bandwidth floor.
- :func:`card_folder`: a result's folder, one per card ("h200" for "NVIDIA H200", "h100x4" for four of them,
  "cpu"), so that results live at ``benchmarks/results/<card>/<topic>.md``, one file per card and topic.
- :class:`Table`, :func:`header`, :func:`write_results`, :func:`publish`: the markdown (and JSON) of a result.

From a shell (benchmarks/check_gpu.sh, benchmarks/context_parallel.sh)::

    python -m lightning_attention.bench.environment                  # the stamp, one line
    python -m lightning_attention.bench.environment --folder [--gpus N]   # the results folder, e.g. h200x4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

__all__ = [
    "environment",
    "stamp",
    "cpu_model",
    "load_average",
    "copy_bandwidth",
    "card_folder",
    "command_line",
    "header",
    "write_results",
    "publish",
    "Table",
]


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none): on a shared machine it says how far to trust a time."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.splitlines() or ["unknown"])[0].strip() or "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment(device: str | torch.device = "cuda") -> dict[str, str]:
    """``{"card", "driver", "torch", "triton", "python"}``, recorded with every number.

    CUDA: card = the device's name and SM count ("NVIDIA H100 80GB HBM3 (132 SMs)"), driver from nvidia-smi.
    CPU: card = "CPU (<model>, <n> cores)", driver "-"."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        card, driver = f"{props.name} ({props.multi_processor_count} SMs)", _driver()
    else:
        card, driver = f"CPU ({cpu_model()}, {os.cpu_count()} cores)", "-"
    return {
        "card": card,
        "driver": driver,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
    }


def stamp(env: dict) -> str:
    """One markdown line: ``card: ... | driver: ... | torch: ... | ...``."""
    return " | ".join(f"{key}: {value}" for key, value in env.items())


def copy_bandwidth(device: str | torch.device = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    CUDA: ``nbytes`` copied, median of triton.testing.do_bench. CPU: a 4 MiB copy timed on the host (only to
    exercise a benchmark's code path there; the number means little)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
        return 2 * nbytes / (ms * 1e-3)
    src = torch.randn(1 << 20)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(seconds)


def card_folder(card: str, gpus: int = 1) -> str:
    """Results folder of a card: its model in lower case ("h200" for "NVIDIA H200 (132 SMs)"), "cpu" for a CPU
    (``environment("cpu")["card"]``), else the name in lower case with underscores; ``x<gpus>`` appended for a
    result over several GPUs ("h100x4")."""
    if card.lower().startswith("cpu"):
        name = "cpu"
    else:
        from lightning_attention.engines.triton.tuning import card_model

        model = card_model(card)
        name = model.lower() if model else re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()
    return f"{name}x{gpus}" if gpus > 1 else name


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a reader would retype it: ``python -m lightning_attention bench ...`` or
    ``python benchmarks/bench_decode.py ...`` (the script relative to the working directory)."""
    argv = sys.argv if argv is None else argv
    script = argv[0]
    if os.path.basename(script) == "__main__.py":
        program = "python -m lightning_attention"
    else:
        program = f"python {os.path.relpath(script) if os.path.isabs(script) else script}"
    return " ".join([program, *argv[1:]])


def header(title: str, env: dict, *notes: str) -> list[str]:
    """The first lines of a result: the title, the environment's stamp, the running command (:func:`command_line`)
    and ``notes`` (paragraphs)."""
    lines = [f"# {title}", "", stamp(env), "", f"command: `{command_line()}`", ""]
    for note in notes:
        lines += [note, ""]
    return lines


def write_results(root: str, topic: str, env: dict, lines: list[str], payload: dict | None = None, gpus: int = 1):
    """``root/<card>/<topic>.md`` (``lines``) and, with ``payload``, ``<topic>.json`` beside it, the card's folder
    from ``env["card"]`` (:func:`card_folder`); returns the markdown's path."""
    folder = os.path.join(root, card_folder(env["card"], gpus))
    os.makedirs(folder, exist_ok=True)
    if payload is not None:
        with open(os.path.join(folder, f"{topic}.json"), "w") as f:
            json.dump(payload, f, indent=1, default=str)
    path = os.path.join(folder, f"{topic}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def publish(root: str | None, topic: str, env: dict, lines: list[str], payload: dict | None = None,
            echo: bool = True) -> int:
    """The end of a benchmark's run: print ``lines`` (unless ``echo`` is False: a :class:`Table` printed them as
    they came) and, with ``root``, write them (:func:`write_results`) and say where. Returns 0, the exit code."""
    if echo:
        print("\n".join(lines))
    if root:
        print(f"written: {write_results(root, topic, env, lines, payload)}")
    return 0


class Table(list):
    """Markdown lines, printed as they are added (a run cut short by its time limit still shows them)."""

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.append(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the environment stamp, or the results folder of this card.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--folder", action="store_true", help="print the results folder name instead (h200, cpu)")
    parser.add_argument("--gpus", type=int, default=1, help="with --folder: GPUs of the result (h200x4)")
    args = parser.parse_args(argv)
    env = environment(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(card_folder(env["card"], args.gpus) if args.folder else stamp(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
