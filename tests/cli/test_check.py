"""python -m lightning_attention check: the table, the exit code, and skipping backends that cannot run."""

import argparse

import pytest

from lightning_attention.__main__ import main
from lightning_attention.cli import check
from lightning_attention.engines.cpu import recurrent


def _table_rows(output: str, backend: str):
    return [line for line in output.splitlines() if line.startswith(f"{backend} ") and "skipped" not in line]


def test_torch_backend_passes_and_names_every_case(capsys):
    assert main(["check", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out, "torch")
    assert len(rows) == 2 * len(check.CASES)
    for op in ("chunk", "recurrent"):
        for case in check.CASES:
            assert any(f" {op} " in row and case.name in row and row.endswith("ok") for row in rows), (op, case.name)
    assert "fwd max abs err" in out and "grad max abs err" in out
    assert "all checks passed" in out


def test_wrong_engine_fails(monkeypatch, capsys):
    """A 0.1% error in the token-loop engine (used up to 64 tokens per sequence) must turn exactly the recurrent
    op's rows that use it (T37, and the varlen case: 25 tokens per sequence) into FAIL and the exit code 1."""
    real = recurrent.recurrent_scan_dense

    def off_by_a_little(q, k, v, g, state):
        o, state = real(q, k, v, g, state)
        return o * 1.001, state

    monkeypatch.setattr(recurrent, "recurrent_scan_dense", off_by_a_little)
    assert check.run(argparse.Namespace(dtype="float32", backend="torch")) == 1
    out = capsys.readouterr().out
    failed = [row for row in _table_rows(out, "torch") if row.endswith("FAIL")]
    assert failed and all(" recurrent " in row and ("T37" in row or "varlen" in row) for row in failed)
    assert any("T37" in row for row in failed) and any("varlen" in row for row in failed)
    assert "check(s) FAILED" in out


def test_triton_without_cuda_or_interpreter_is_skipped(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA the Triton backend runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["check", "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "triton   skipped: no CUDA device" in out
    assert not _table_rows(out, "triton")


def test_triton_engine_that_does_not_import_is_skipped(monkeypatch, capsys):
    from lightning_attention import engines

    def broken(backend, algorithm):
        raise ImportError("no module named kernels")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(engines, "get_engine", broken)
    device, reason = check._backend_device("triton")
    assert device is None and "ImportError: no module named kernels" in reason
