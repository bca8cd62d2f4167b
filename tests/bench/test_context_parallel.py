"""benchmarks/bench_context_parallel.py (lightning_attention.bench.context_parallel) at tiny size on CPU (gloo, 2
processes under torchrun), then its report: the GPU run must not be the first to find a broken path. Bounded by a
hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_context_parallel.py"


def test_benchmark_runs_at_tiny_size_and_reports(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    tiny = [
        "--device", "cpu", "--tokens", "300", "--no-decay-tokens", "200", "--packed-tokens", "400",
        "--doc-lengths", "16", "120", "--heads", "2", "--head-dim", "16", "--check-tokens", "96", "--iters", "1",
        "--gates-tokens", "250",
        "--exchange-iters", "3",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    run = subprocess.run(
        [*launch, "--out", str(tmp_path / "cp_P2.json"), *tiny], env=env, capture_output=True, text=True, timeout=150
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads((tmp_path / "cp_P2.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "torch"
    assert result["signature_s"] > 0 and result["state_allgather_s"] > 0
    assert all(e["ok"] for e in result["check"].values()), result["check"]
    assert {name.split(": ")[0] for name in result["check"]} == {
        "one sequence", "packed documents", "packed documents, gates"
    }
    assert "packed documents, gates: dg" in result["check"]
    assert set(result["bench"]) == {"300-tnl", "200-none", "250-gates", "400-packed"}
    for key, r in result["bench"].items():
        assert r["local_s"] > 0 and r["cp_s"] > 0, (key, r)
    assert result["bench"]["400-packed"]["documents"] >= 4

    results = tmp_path / "results"
    report = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(tmp_path), "--results", str(results)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-4000:]
    text = (tmp_path / "context_parallel.md").read_text()
    assert (results / "cpux2" / "context_parallel.md").read_text() == text  # the card and the most GPUs launched
    assert "call-signature exchange" in text and "torch 2." in text and "card seen by torch: CPU (" in text
    rows = [line for line in text.splitlines() if line.startswith("| 400 | packed documents")]
    assert len(rows) == 1 and "documents)" in rows[0], text
    assert text.count("| yes |") == len(result["check"]), text
