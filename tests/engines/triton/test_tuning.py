"""Launch tables per card (engines/triton/tuning.py): every case the kernels ask for is in each shipped table, the
nearest table serves an unknown card with one warning, a user's table (written by the tune command) takes
precedence case by case, and a candidate under ``using`` reaches the config functions and leaves with them."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")

from lightning_attention.engines.triton import chunk_bwd, chunk_scan, decode, recurrent, tuning  # noqa: E402

CPU = torch.device("cpu")
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.TUNING_DIR_VARIABLE, str(tmp_path))
    tuning._tables_changed()
    yield tmp_path
    tuning._tables_changed()


def _scan_cases() -> set[str]:
    return {
        chunk_scan.scan_case(dk, dtype, precision, gated)
        for dk in (16, 64, 128, 256)
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for precision in ("tf32", "tf32x3", "ieee", "upcast")
        for gated in (False, True)
    }


def test_first_shipped_table_holds_every_case():
    table = next(iter(tuning.SHIPPED.values()))
    for case in _scan_cases():
        assert table.get("scan", case) is not None, case
    for kernel, cases in (("dkdv", ("16bit", "fp32")), ("decode", ("float32", "bfloat16")), ("recurrent", ("any",))):
        for case in cases:
            assert table.get(kernel, case) is not None, (kernel, case)


CONFIGS = {
    "scan": chunk_scan.ScanLaunchConfig,
    "dkdv": chunk_bwd.DkDvConfig,
    "decode": decode.DecodeConfig,
    "recurrent": lambda state_tile, num_warps: (state_tile, num_warps),
}


@pytest.mark.parametrize("card", list(tuning.SHIPPED))
def test_shipped_entries_are_configurations(card):
    """Every entry of every table builds its kernel's configuration, and the config functions serve it."""
    table = tuning.SHIPPED[card]
    for kernel, cases in table.entries.items():
        for case, entry in cases.items():
            CONFIGS[kernel](**entry)
    with tuning.using(table):
        for case in table.entries.get("decode", {}):
            dtype, _, multi = case.partition("-")
            config = decode.decode_config(getattr(torch, dtype), CPU, multi_token=bool(multi))
            assert config == decode.DecodeConfig(**table.get("decode", case)), case
        chunk_bwd.dkdv_config(torch.float32, CPU)  # (cases it lacks: from the first table)
        recurrent.recurrent_config(CPU)


def test_cpu_interpreter_uses_the_first_table_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = next(iter(tuning.SHIPPED.values()))
        assert tuning.table_for(CPU) is first
        assert decode.decode_config(torch.float32, CPU) == decode.DecodeConfig(**first.get("decode", "float32"))
        # A table without a multi-token case: rows of several tokens take the one-token tiles.
        assert first.get("decode", "float32-multi") is None
        assert decode.decode_config(torch.float32, CPU, multi_token=True) == decode.decode_config(torch.float32, CPU)


def test_unknown_cards_take_the_nearest_table_with_one_warning(tuning_dir, monkeypatch):
    other = tuning.CardTable("NVIDIA A100-SXM4-80GB", (8, 0), 108, tuning.SHIPPED[H100].entries)
    monkeypatch.setitem(tuning.SHIPPED, other.card, other)
    tuning._tables_changed()
    cases = [
        (("NVIDIA H100 PCIe", (9, 0), 114), H100),  # the same model
        (("NVIDIA A100 80GB PCIe", (8, 0), 108), other.card),  # the same model, another name
        (("NVIDIA A30", (8, 0), 56), other.card),  # the same capability
        (("Some GPU", (12, 0), 84), H100),  # nothing alike: the first table
    ]
    for facts, expected in cases:
        with pytest.warns(UserWarning, match="no launch table for") as seen:
            assert tuning._tables_for_card(*facts)[1].card == expected
            tuning._tables_for_card(*facts)
        assert len(seen) == 1, facts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning._tables_for_card(H100, (9, 0), 132) == (None, tuning.SHIPPED[H100])


def test_user_table_takes_precedence_case_by_case(tuning_dir):
    mine = {"decode": {"float32": dict(block_v=32, block_k=16, num_warps=2)}}
    path = tuning.write_user_table(tuning.CardTable(H100, (9, 0), 132, mine))
    assert path.parent == tuning_dir and path.is_file()
    user, shipped = tuning._tables_for_card(H100, (9, 0), 132)
    assert user.get("decode", "float32") == mine["decode"]["float32"] and user.source == str(path)
    assert shipped is tuning.SHIPPED[H100]
    other = tuning.CardTable("NVIDIA H200", (9, 0), 132, {})
    tuning.write_user_table(other)
    path.write_text(tuning.user_table_path(other.card).read_text())  # another card's table under this card's name
    tuning._tables_changed()
    with pytest.raises(ValueError, match="holds a table for 'NVIDIA H200'"):
        tuning._tables_for_card(H100, (9, 0), 132)


def test_candidate_reaches_the_config_functions_and_leaves():
    shipped = chunk_scan.scan_config(128, 128, torch.bfloat16, CPU)
    entry = dict(tuning.SHIPPED[H100].get("scan", "16bit"), num_stages=1, tma_stages=2)
    with tuning.using(tuning.CardTable("candidate", (0, 0), 0, {"scan": {"16bit": entry}})):
        assert chunk_scan.scan_config(128, 128, torch.bfloat16, CPU) == chunk_scan.ScanLaunchConfig(**entry)
        assert chunk_scan.scan_config(256, 256, torch.bfloat16, CPU) == chunk_scan.scan_config(
            256, 256, torch.bfloat16, CPU
        )  # other cases: as shipped
    assert chunk_scan.scan_config(128, 128, torch.bfloat16, CPU) == shipped != chunk_scan.ScanLaunchConfig(**entry)


def test_card_model():
    assert tuning.card_model("NVIDIA H100 80GB HBM3") == tuning.card_model("NVIDIA H100 PCIe") == "H100"
    assert tuning.card_model("NVIDIA A100-SXM4-40GB") == "A100"
    assert tuning.card_model("cpu") is None
