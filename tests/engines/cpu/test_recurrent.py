"""The token-by-token torch engine against the float64 closed form of the scan contract (engines/base.py)."""

import pytest

from lightning_attention.engines.cpu import recurrent
from tests.closed_form import (
    assert_engine_backward_matches_closed_form,
    assert_scan_matches_closed_form,
    scan_case_params,
)


@pytest.mark.parametrize("T, with_state, state_offset, reverse, cu_seqlens", scan_case_params())
def test_scan_contract(T, with_state, state_offset, reverse, cu_seqlens):
    assert_scan_matches_closed_form(recurrent.recurrent_scan, T, with_state, state_offset, reverse, cu_seqlens)


@pytest.mark.parametrize(
    "T, reverse, cu_seqlens",
    [
        pytest.param(37, False, None, id="forward"),
        pytest.param(37, True, None, id="reverse"),
        pytest.param(50, True, (0, 0, 1, 33, 33, 50), id="varlen-reverse"),
    ],
)
def test_backward(T, reverse, cu_seqlens):
    assert_engine_backward_matches_closed_form(recurrent.ENGINE, T, reverse, cu_seqlens)
