"""The token-by-token torch engine against the float64 closed form of the scan contract (engines/base.py), with
a constant decay per head and with per-token gates g."""

import pytest
import torch

from lightning_attention.engines import RECURRENT_MAX_T, get_engine
from lightning_attention.engines.cpu import recurrent
from tests.closed_form import (
    GATE_KINDS,
    assert_engine_backward_matches_closed_form,
    assert_gated_scan_matches_definition,
    assert_scan_matches_closed_form,
    scan_case_params,
)


@pytest.mark.parametrize("T, with_state, shift, reverse, cu_seqlens", scan_case_params())
def test_scan_contract(T, with_state, shift, reverse, cu_seqlens):
    assert_scan_matches_closed_form(recurrent.recurrent_scan, T, with_state, shift, reverse, cu_seqlens)


@pytest.mark.parametrize(
    "T, reverse, cu_seqlens",
    [
        pytest.param(37, False, None, id="forward"),
        pytest.param(37, True, None, id="reverse"),
        pytest.param(50, True, (0, 0, 1, 33, 33, 50), id="varlen-reverse"),
    ],
)
def test_backward(T, reverse, cu_seqlens):
    assert_engine_backward_matches_closed_form(recurrent.TOKEN_LOOP, T, reverse, cu_seqlens)


@pytest.mark.parametrize("gates", GATE_KINDS)
@pytest.mark.parametrize("T, with_state, shift, reverse, cu_seqlens", scan_case_params())
def test_gated_scan_contract(T, with_state, shift, reverse, cu_seqlens, gates):
    assert_gated_scan_matches_definition(recurrent.recurrent_scan, T, with_state, shift, reverse, cu_seqlens, gates)


def test_three_scan_backward_has_no_dg():
    """The token-loop engine's backward (three scans) cannot form dg: asked for it, it says so."""
    with pytest.raises(NotImplementedError, match="dg"):
        assert_engine_backward_matches_closed_form(recurrent.TOKEN_LOOP, 37, False, None, gates="random")


@pytest.mark.parametrize("gates", GATE_KINDS)
@pytest.mark.parametrize(
    "T, reverse, cu_seqlens",
    [
        pytest.param(37, False, None, id="forward"),
        pytest.param(50, True, (0, 0, 1, 33, 33, 50), id="varlen-reverse"),
    ],
)
def test_recurrent_op_gated_backward_runs_the_chunked_one(T, reverse, cu_seqlens, gates):
    """The recurrent op's engine (token loop for short sequences) with gates: the backward is the chunked engine's,
    dg included, for sequences the forward ran token by token."""
    engine = get_engine("torch", "recurrent")
    assert T <= RECURRENT_MAX_T and engine.pick(torch.empty(1, T, 1, 1), None) is recurrent.TOKEN_LOOP
    assert_engine_backward_matches_closed_form(engine, T, reverse, cu_seqlens, gates=gates)

