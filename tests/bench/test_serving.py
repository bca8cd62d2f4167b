"""The serving benchmark's script (lightning_attention.bench.serving through benchmarks/bench_decode.py) at tiny
shapes on the CPU (--smoke: the Triton interpreter, host timers), so that a GPU run does not find its bugs: every
section and the sweep run and the results file has a row for every case."""

import re


def test_smoke_run_writes_every_section(tmp_path, run_script):
    run_script("bench_decode.py", "--smoke", "--sweep", "--out", str(tmp_path))
    (folder,) = tmp_path.iterdir()  # one folder, named after the card
    assert folder.name == "cpu"
    text = (folder / "serving.md").read_text()
    assert text.splitlines()[2].startswith("card: CPU") and "triton: " in text.splitlines()[2]
    assert re.search(r"command: `python \S*bench_decode\.py --smoke --sweep --out ", text)
    lines = text.splitlines()
    decode = [r for r in lines if re.match(r"\| \d+ \| (fp32|bf16) \| [\d.]+ \|", r) and r.count("|") == 11]
    multi = [r for r in lines if re.match(r"\| \d+ \| (fp32|bf16) \| \d \|", r) and r.count("|") == 13]
    prefill = [r for r in lines if re.match(r"\| \d+ x \d+ \|", r)]
    sweep = [r for r in lines if re.match(r"\| (fp32|bf16) \| \d+ \|", r)]
    assert (len(decode), len(multi), len(prefill), len(sweep)) == (4, 4, 2, 4), text
    assert "Suggested decode entry" in text and "nan" not in text
    assert (folder / "serving.json").exists()


def test_accuracy_run_writes_its_table_in_the_cards_folder(tmp_path, capsys):
    """--accuracy at a few steps on the CPU (the torch path): one row per schedule and cache dtype, errors finite."""
    from lightning_attention.bench import serving

    serving.bench_accuracy(str(tmp_path), "cpu", steps=12)
    text = (tmp_path / "cpu" / "decode_bf16_accuracy.md").read_text()
    rows = [r for r in text.splitlines() if re.match(r"\| (tnl|minimax) \| (fp32|bf16) \|", r)]
    assert len(rows) == 4 and "nan" not in text, text
    assert (tmp_path / "cpu" / "decode_bf16_accuracy.json").exists()
