"""torch.compile / torch.library checks on CUDA (run on the device; results kept in benchmarks/results/).

Runs the CUDA half of tests/test_compile.py and tests/nn/test_layer_compile.py (the parameters marked ``gpu``:
backends "torch" and "triton" on CUDA, slow tests included), i.e. for every custom op
(``lightning_attention::chunk_scan``, ``::recurrent_scan``, their ``_backward`` ops, ``::decode``, ``::prefill``)
``torch.library.opcheck`` over several sample inputs, and ``torch.compile(fullgraph=True)`` of the public ops
and of the LightningAttention layer (aot_eager and inductor, dynamic T, activation checkpointing, autocast,
training loop) compared with eager. The same tests run on CPU in CI; nothing is re-implemented here.

Writes ``compile_check_cuda.md`` (card, versions, one line per test) and the pytest log / junit XML into
``--out``; exits with pytest's status.

    python benchmarks/gpu/compile_check.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_FILES = ["tests/test_compile.py", "tests/nn/test_layer_compile.py"]


def _results(junit_path: str) -> list[tuple[str, str, str]]:
    """(test id, outcome, first line of the message) for every test case in a junit XML file."""
    rows = []
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        rows.append((f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", outcome, message))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for compile_check_cuda.md and logs")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of the checks)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.chdir(REPO)
    sys.path[:0] = [os.path.join(REPO, "src"), REPO]

    import pytest
    import torch

    if not torch.cuda.is_available():
        print("compile_check: needs a CUDA device")
        return 1
    from lightning_attention.bench import environment

    env = environment()
    junit = os.path.join(out, "compile_check_cuda.xml")
    pytest_args = [*TEST_FILES, "-m", "gpu", "--runslow", "-q", "-p", "no:cacheprovider"]
    if args.k:
        pytest_args += ["-k", args.k]
    status = pytest.main([*pytest_args, f"--junitxml={junit}"])

    rows = _results(junit)
    counts = {o: sum(r[1] == o for r in rows) for o in ("passed", "FAILED", "ERROR", "skipped")}
    lines = [
        "# torch.compile / torch.library.opcheck checks on CUDA",
        "",
        " | ".join(f"{k}: {v}" for k, v in env.items()),
        "",
        f"`python benchmarks/gpu/compile_check.py` (pytest {' '.join(pytest_args)}): "
        + ", ".join(f"{n} {o}" for o, n in counts.items()),
        "",
        "| test | outcome | message |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {outcome} | {message} |" for name, outcome, message in rows]
    with open(os.path.join(out, "compile_check_cuda.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
