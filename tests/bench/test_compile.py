"""The torch.compile benchmark (lightning_attention.bench.compile) at one tiny shape on the CPU: the compiled layer
has one graph and no break, and the result lands in the CPU's folder (compiling takes ~40 s: slow)."""

import json

import pytest

from lightning_attention.bench import compile as bench_compile


@pytest.mark.slow
def test_tiny_run_writes_its_row(tmp_path):
    argv = ["--shapes", "1x64x32/2", "--reps", "1", "--backend", "torch", "--out", str(tmp_path)]
    assert bench_compile.main(argv) == 0
    text = (tmp_path / "cpu" / "compile.md").read_text()
    assert text.splitlines()[2].startswith("card: CPU") and "torch_threads: " in text.splitlines()[2]
    (row,) = json.loads((tmp_path / "cpu" / "compile.json").read_text())["rows"]
    assert row["shape"] == "1x64x32/2" and (row["graphs"], row["graph_breaks"]) == (1, 0)
    assert row["eager_fwdbwd_ms"] > 0 and row["compiled_fwdbwd_ms"] > 0
    assert "| 1x64x32/2 | fp32 |" in text
