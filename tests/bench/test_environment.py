"""lightning_attention.bench.environment: the stamp of every result, the folder per card, the result files."""

import json
import platform

import pytest
import torch

from lightning_attention.bench import environment


@pytest.mark.parametrize(
    "card, gpus, folder",
    [
        pytest.param("NVIDIA H200 (132 SMs)", 1, "h200", id="h200"),
        pytest.param("NVIDIA H100 80GB HBM3 (132 SMs)", 4, "h100x4", id="h100-4-gpus"),
        pytest.param("NVIDIA A100-SXM4-80GB", 1, "a100", id="a100"),
        pytest.param("CPU (AMD EPYC 7B13, 2 cores)", 1, "cpu", id="cpu"),
        pytest.param("Some Card (8 SMs)", 2, "some_card_8_smsx2", id="no-model-number"),
    ],
)
def test_card_folder(card, gpus, folder):
    assert environment.card_folder(card, gpus) == folder


def test_cpu_environment_names_the_machine_and_versions():
    env = environment.environment("cpu")
    assert list(env) == ["card", "driver", "torch", "triton", "python"]
    assert env["card"].startswith("CPU (") and env["torch"] == torch.__version__
    assert env["python"] == platform.python_version()
    assert environment.card_folder(env["card"]) == "cpu"
    assert environment.stamp(env).startswith(f"card: {env['card']} | driver: -")


def test_copy_bandwidth_on_the_cpu_is_a_rate():
    assert 1e6 < environment.copy_bandwidth("cpu") < 1e14


@pytest.mark.parametrize(
    "argv, command",
    [
        pytest.param(["/x/src/lightning_attention/__main__.py", "bench"], "python -m lightning_attention bench",
                     id="module"),
        pytest.param(["benchmarks/bench_decode.py", "--sweep"], "python benchmarks/bench_decode.py --sweep",
                     id="script"),
    ],
)  # fmt: skip
def test_command_line(argv, command):
    assert environment.command_line(argv) == command


def test_results_are_one_file_per_card_and_topic(tmp_path):
    env = {"card": "NVIDIA H200 (132 SMs)", "driver": "1", "torch": "t", "triton": "3"}
    lines = environment.header("Title", env, "a note") + ["| a |", "|---|"]
    assert lines[:3] == ["# Title", "", "card: NVIDIA H200 (132 SMs) | driver: 1 | torch: t | triton: 3"]
    assert lines[4].startswith("command: `python ") and lines[6] == "a note"
    path = environment.write_results(str(tmp_path), "topic", env, lines, payload={"rows": [1]})
    assert path == str(tmp_path / "h200" / "topic.md")
    assert (tmp_path / "h200" / "topic.md").read_text() == "\n".join(lines) + "\n"
    assert json.loads((tmp_path / "h200" / "topic.json").read_text()) == {"rows": [1]}
    environment.write_results(str(tmp_path), "topic", env, lines[:1], gpus=2)
    assert (tmp_path / "h200x2" / "topic.md").read_text() == "# Title\n"


def test_command_prints_the_folder_or_the_stamp(capsys):
    assert environment.main(["--device", "cpu", "--folder", "--gpus", "2"]) == 0
    assert capsys.readouterr().out == "cpux2\n"
    assert environment.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("card: CPU (")
