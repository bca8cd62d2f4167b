"""The chunked torch engine against the float64 closed form of the scan contract (engines/base.py), with a
constant decay per head and with per-token gates g (dg included)."""

import pytest
import torch

from lightning_attention.engines.cpu import chunk
from lightning_attention.testing import assert_matches_baseline
from tests.closed_form import (
    G_GAMMA,
    GATE_KINDS,
    SCALE,
    assert_engine_backward_matches_closed_form,
    assert_gated_scan_matches_definition,
    assert_scan_matches_closed_form,
    closed_form_scan,
    scan_case_params,
    scan_gates,
    scan_inputs,
)

CHUNK_SIZES = [pytest.param(16, id="C16"), pytest.param(64, id="C64")]
BACKWARD_CASES = [
    pytest.param(37, False, None, id="forward"),
    pytest.param(37, True, None, id="reverse"),
    pytest.param(50, True, (0, 0, 1, 33, 33, 50), id="varlen-reverse"),
    pytest.param(0, False, None, id="T0"),
]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("T, with_state, shift, reverse, cu_seqlens", scan_case_params())
def test_scan_contract(T, with_state, shift, reverse, cu_seqlens, chunk_size):
    assert_scan_matches_closed_form(chunk.chunk_scan, T, with_state, shift, reverse, cu_seqlens, chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("T, reverse, cu_seqlens", BACKWARD_CASES)
def test_backward(T, reverse, cu_seqlens, chunk_size):
    assert_engine_backward_matches_closed_form(chunk.ENGINE, T, reverse, cu_seqlens, chunk_size)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_low_precision_accumulates_in_float32(dtype):
    """bf16/fp16 inputs: o in the input dtype, state in float32, as accurate as a float32 computation rounded
    once to the input dtype (the closed form on the same inputs, its output cast to dtype)."""
    q, k, v, state, cu = scan_inputs(200, True, None, dtype=dtype)
    state = state.float()
    o, final = chunk.chunk_scan(q, k, v, G_GAMMA, SCALE, state, 0, False, cu, 64)
    assert o.dtype == dtype and final.dtype == torch.float32
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, SCALE, state)
    assert_matches_baseline(o, o_ref, o_ref.to(dtype), "o")
    assert_matches_baseline(final, final_ref, final_ref.float(), "final", floor=1e-6)


@pytest.mark.parametrize("gates", GATE_KINDS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("T, with_state, shift, reverse, cu_seqlens", scan_case_params())
def test_gated_scan_contract(T, with_state, shift, reverse, cu_seqlens, chunk_size, gates):
    assert_gated_scan_matches_definition(
        chunk.chunk_scan, T, with_state, shift, reverse, cu_seqlens, gates, chunk_size
    )


@pytest.mark.parametrize("gates", GATE_KINDS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("T, reverse, cu_seqlens", BACKWARD_CASES)
def test_gated_backward(T, reverse, cu_seqlens, chunk_size, gates):
    """dq, dk, dv, dh0 and dg with per-token gates (incl. dht, and g = -20 where dg is ~1e-9 of each term)."""
    assert_engine_backward_matches_closed_form(chunk.ENGINE, T, reverse, cu_seqlens, chunk_size, gates)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_gated_low_precision_accumulates_in_float32(dtype):
    """Per-token gates in bf16/fp32 runs: o in the input dtype, state float32, as accurate as a float32 computation
    rounded once (the float64 closed form on the same inputs, cast)."""
    q, k, v, state, cu = scan_inputs(200, True, None, dtype=dtype)
    state = state.float()
    g = scan_gates("random", *q.shape[:2]).float()
    o, final = chunk.chunk_scan(q, k, v, G_GAMMA, SCALE, state, 0, False, cu, 64, g=g)
    assert o.dtype == dtype and final.dtype == torch.float32
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, SCALE, state, g=g)
    assert_matches_baseline(o, o_ref, o_ref.to(dtype), "o")
    assert_matches_baseline(final, final_ref, final_ref.float(), "final", floor=1e-6)
