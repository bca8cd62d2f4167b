"""lightning_attention.bench.chunk on the host: shape parsing, the markdown table and the plot (the timing itself
needs a GPU and runs on the device: benchmarks/results/<card>/chunk.md)."""

import pytest
import torch

from lightning_attention.bench import chunk

ENV = {"card": "NVIDIA H200 (132 SMs)", "driver": "0", "torch": torch.__version__, "triton": "-"}


def _rows():
    row = chunk.Row((1, 2048, 2, 64), torch.bfloat16, floor_fwd_ms=0.5, floor_fwdbwd_ms=1.0)
    row.results = [
        chunk.Result("ours", 1.0, 3.0, 12.0, "", fwd_graph_ms=0.75, fwdbwd_graph_ms=2.0),
        chunk.Result("fla", 2.0, 6.0, 24.0),  # no graph replay: the plot falls back to the eager time
        chunk.Result("sdpa_flash", note="flash needs fp16/bf16"),
    ]
    return [row]


def test_parse_shape():
    assert chunk.parse_shape("4x8192x32x128") == (4, 8192, 32, 128, torch.bfloat16)
    assert chunk.parse_shape("2x16x1x64:fp32") == (2, 16, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="bad shape"):
        chunk.parse_shape("0x16x1x64")


def test_markdown_table_has_ratios_to_the_floor_and_graph_times():
    lines = chunk.to_markdown(_rows(), ENV, 3e12)
    assert "card: NVIDIA H200 (132 SMs) | driver: 0" in lines[2] and "copy bandwidth: 3.00 TB/s" in lines
    assert "| 1x2048x2x64 | bfloat16 | floor | 0.500 | 1.000 | 1.00 | 1.00 | | | | |" in lines
    assert "| 1x2048x2x64 | bfloat16 | ours | 1.000 | 3.000 | 2.00 | 3.00 | 0.750 | 2.000 | 12 |  |" in lines
    assert "| 1x2048x2x64 | bfloat16 | sdpa_flash | - | - | - | - | - | - | - | flash needs fp16/bf16 |" in lines


def test_results_go_to_the_cards_folder_with_the_plot_beside_them(tmp_path):
    pytest.importorskip("matplotlib")
    path = chunk._write(_rows(), str(tmp_path), ENV, 3e12)
    assert path == str(tmp_path / "h200" / "chunk.md")
    assert (tmp_path / "h200" / "chunk.md").read_text().splitlines() == chunk.to_markdown(_rows(), ENV, 3e12)
    assert (tmp_path / "h200" / "chunk.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_shows_gpu_time_where_measured_and_writes_a_png(tmp_path, monkeypatch):
    """Points are the CUDA-graph (GPU) times where a provider has them, else its eager times; providers without
    a time are left out."""
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() closes
    path = tmp_path / "chunk.png"
    chunk.plot(_rows(), str(path), ENV)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    forward, fwd_bwd = figures[0].axes[:2]
    points = {line.get_label().split()[0]: (list(line.get_ydata()), list(l2.get_ydata()))
              for line, l2 in zip(forward.lines, fwd_bwd.lines)}  # fmt: skip
    assert points == {"ours": ([0.75], [2.0]), "fla": ([2.0], [6.0]), "floor": ([0.5], [1.0])}


@pytest.mark.parametrize("name", ["ours", "ours_g"])
def test_our_providers_run_forward_and_backward(triton_device, name):
    """What the benchmark times for our op, with g_gamma and with per-token gates (dg included), runs at a tiny
    size (on CPU under the Triton interpreter), so that a GPU run of the benchmark does not stop at a bug."""
    import inspect

    from lightning_attention import ops

    if name == "ours_g" and "g" not in inspect.signature(ops.chunk_simple_gla).parameters:
        pytest.skip("the public op takes per-token gates once issue 23's ops change is merged")
    x = chunk.make_inputs(1, 70, 2, 16, torch.float32, device=triton_device)
    forward, fwdbwd = chunk.calls(name, chunk._providers()[name], x)
    assert forward().shape == (1, 70, 2, 16)
    grads = fwdbwd()
    assert len(grads) == (4 if name in chunk.GATED else 3)
    assert all(bool(torch.isfinite(t).all()) for t in grads)
