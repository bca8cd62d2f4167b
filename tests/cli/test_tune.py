"""``python -m lightning_attention tune`` (cli/tune.py) under the Triton interpreter (``--smoke``): every kernel's
workload runs its table entry and a candidate, the chosen entries are written as this card's table and read back
by the config functions; a candidate that does not fit is never chosen."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from lightning_attention.__main__ import main  # noqa: E402
from lightning_attention.cli import tune  # noqa: E402
from lightning_attention.engines.triton import decode, recurrent, tuning  # noqa: E402


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch, triton_device):
    if triton_device != "cpu":
        pytest.skip("writes a table for the present GPU: the smoke run is for the CPU interpreter")
    monkeypatch.setenv(tuning.TUNING_DIR_VARIABLE, str(tmp_path))
    tuning._tables_changed()
    yield tmp_path
    tuning._tables_changed()


def test_every_table_case_has_a_workload():
    cases = {(w.kernel, w.case) for w in tune.workloads()}
    for table in tuning.SHIPPED.values():
        for kernel, entries in table.entries.items():
            assert {(kernel, case) for case in entries} <= cases, kernel


def test_smoke_run_writes_a_table_the_kernels_read(tuning_dir, capsys, monkeypatch):
    chosen = dict(block_v=32, block_k=64, num_warps=4)
    monkeypatch.setattr(tune, "DECODE_CANDIDATES", [chosen])

    def timed(fn, smoke):  # runs the call; the candidate is the fastest
        fn()
        return 1.0 if tuning._OVERRIDE.get("decode", "float32") == chosen else 2.0

    monkeypatch.setattr(tune, "_time_ms", timed)
    assert main(["tune", "--smoke", "--kernels", "decode", "recurrent", "--out", str(tuning_dir / "results")]) == 0
    out = capsys.readouterr().out
    written = json.loads(tuning.user_table_path("cpu").read_text())
    assert written["card"] == "cpu" and set(written["entries"]) == {"decode", "recurrent"}
    assert written["entries"]["decode"]["float32"] == chosen and "decode" in out
    assert (tuning_dir / "results" / "cpu" / "tuning.md").is_file()
    with pytest.warns(UserWarning, match="no launch table for 'cpu'"):
        user, _ = tuning._tables_for_card("cpu", (0, 0), 0)
    with tuning.using(user):  # (on a GPU the card's file is read by name; the CPU has none)
        assert decode.decode_config(torch.float32, torch.device("cpu")) == decode.DecodeConfig(**chosen)
        entry = written["entries"]["recurrent"]["any"]
        assert recurrent.recurrent_config(torch.device("cpu")) == (entry["state_tile"], entry["num_warps"])


def test_candidates_that_do_not_fit_are_skipped(monkeypatch):
    from lightning_attention.engines.triton import _common

    workload = next(w for w in tune.workloads() if w.kernel == "recurrent")
    calls = []

    def fell_back(fn, smoke):
        calls.append(dict(tuning._OVERRIDE.get("recurrent", "any")))
        _common._FIRST_FITTING[("fake", len(calls))] = 0 if len(calls) == 1 else 1  # the candidate fell back
        return 1.0

    monkeypatch.setattr(tune, "_time_ms", fell_back)
    monkeypatch.setattr(workload, "make", lambda smoke: (lambda: None))
    results = tune.measure(workload, tuning.lookup("recurrent", "any", torch.device("cpu")), smoke=True)
    assert [ms for _, ms in results] == [1.0, None] and len(calls) == 2


def test_a_case_keeps_the_entry_best_over_all_its_workloads():
    """A tile 1% faster at one batch size but twice as slow at another loses to one that is close to the best at
    both; an entry that does not fit one workload is never kept; none fitting everywhere keeps nothing."""
    a, b, c = dict(tile=1), dict(tile=2), dict(tile=3)
    results = [[(a, 1.00), (b, 1.01), (c, None)], [(a, 2.00), (b, 1.00), (c, 0.5)]]
    assert tune.choose(results) == (b, [1.01, 1.00])
    assert tune.choose([[(a, 1.0), (b, 2.0)]]) == (a, [1.0])
    assert tune.choose([[(a, None), (b, 1.0)], [(a, 1.0), (b, None)]]) is None


def test_multi_token_decode_is_tuned_on_four_and_eight_tokens():
    labels = [w.label for w in tune.workloads() if (w.kernel, w.case) == ("decode", "float32-multi")]
    assert labels == ["decode N=64 L=4", "decode N=64 L=8", "decode N=256 L=4", "decode N=256 L=8"]
