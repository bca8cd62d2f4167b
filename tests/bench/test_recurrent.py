"""The recurrent benchmark's script (lightning_attention.bench.recurrent through benchmarks/bench_recurrent.py) at
tiny shapes on the CPU (--smoke: the Triton interpreter, host timers), so that a GPU run does not find its bugs."""

import re


def test_smoke_run_writes_every_section(tmp_path, run_script):
    run_script("bench_recurrent.py", "--smoke", "--sweep", "--out", str(tmp_path))
    text = (tmp_path / "cpu" / "recurrent.md").read_text()
    assert text.splitlines()[2].startswith("card: CPU")
    t_sweep = [r for r in text.splitlines() if re.match(r"\| 1 \| 2 \| \d+ \| [\d.]+ \|", r)]
    tiles = [r for r in text.splitlines() if re.match(r"\| \d+ \| \d \| [\d.]+ \|$", r)]
    prefill = [r for r in text.splitlines() if re.match(r"\| 2 x 24 \| 2 \| [\d.]+ \|", r)]
    assert (len(t_sweep), len(tiles), len(prefill)) == (2, 2, 1), text
    assert "crossover" in text and "nan" not in text
    assert (tmp_path / "cpu" / "recurrent.json").exists()
