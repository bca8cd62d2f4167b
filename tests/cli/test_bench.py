import argparse

from lightning_attention.cli import bench


def _args(**overrides):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([f"--{k}={v}" for k, v in overrides.items()])


def test_bench_on_cpu_times_the_torch_engine_against_the_token_loop(tmp_path, capsys):
    args = _args(device="cpu", out=str(tmp_path))
    args.shapes = ["1x130x2x16"]
    assert bench.run(args) == 0
    table = (tmp_path / "cpu" / "chunk.md").read_text()
    assert "| 130 | 2 | 16 |" in table  # the row of the requested shape
    assert "speed-up" in capsys.readouterr().out
