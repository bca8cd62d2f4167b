"""The local-state pass of split sequences (engines/triton/chunk_state.py) against its definition."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lightning_attention.engines.triton import _common  # noqa: E402
from lightning_attention.engines.triton.chunk_state import local_states  # noqa: E402
from tests.engines.triton.test_chunk import split_all_sequences  # noqa: E402


def _local_state(k, v, g, start, end, k_scale, reverse):
    """A = k_scale * sum_j lam^(tokens after j in scan order within [start, end)) k_j^T v_j, float64 [H, K, V]."""
    j = torch.arange(start, end, dtype=torch.float64)
    after = (j - start) if reverse else (end - 1 - j)
    weight = torch.exp(g.double()[:, None] * after[None, :]) * k_scale  # [H, n]
    return torch.einsum("hj,jhk,jhv->hkv", weight, k[start:end].double(), v[start:end].double())


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_local_states_of_every_segment_but_each_sequences_last(triton_device, monkeypatch, reverse):
    """Every segment's A_s from a zero state, except the last one of each sequence in scan order (the first in
    memory for a reverse scan): no scan reads it, so the pass leaves it zero without reading its rows."""
    split_all_sequences(monkeypatch)  # one chunk per segment
    bounds = (0, 150, 150, 170, 300)  # segments: 3, 1 (empty sequence), 1 (a partial chunk), 3
    H, K, V = 2, 24, 40
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(bounds[-1], H, d, generator=gen) for d in (K, V))
    g = torch.tensor([-0.05, -1.0])
    plan = _common.plan_segments(bounds, H, torch.device(triton_device))
    got = local_states(k.to(triton_device), v.to(triton_device), g.to(triton_device), plan, k_scale=0.5,
                       reverse=reverse).states.cpu()  # fmt: skip
    segments = plan.segments.cpu().tolist()
    assert plan.split and len(segments) == 8
    for s, (start, end, _, flags) in enumerate(segments):
        last_in_scan_order = flags & (1 if reverse else 2)
        expected = torch.zeros(H, K, V) if last_in_scan_order else _local_state(k, v, g, start, end, 0.5, reverse)
        torch.testing.assert_close(got[s].double(), expected.double(), rtol=1e-5, atol=1e-5, msg=f"segment {s}")


def _gated_local_state(k, v, a, start, end, k_scale, reverse, first, shift):
    """Per-token log decays a [R, H]: A = k_scale * sum_j exp(sum of a' over the tokens after j in scan order within
    [start, end)) k_j^T v_j and the segment's total of a', float64, with a' = a (shift 0) or the previous token's
    (shift 1: scan order; 0 at the sequence's first token)."""
    order = list(range(end - 1, start - 1, -1)) if reverse else list(range(start, end))
    prev = [t + (1 if reverse else -1) for t in order]
    shifted = torch.stack([torch.zeros(a.shape[1], dtype=torch.float64) if (shift and i == 0 and first) else
                           a[p if shift else t].double() for i, (t, p) in enumerate(zip(order, prev))])  # fmt: skip
    after = shifted.flip(0).cumsum(0).flip(0) - shifted  # [n, H]: sum over the tokens after each
    weight = torch.exp(after) * k_scale
    kk, vv = k[order].double(), v[order].double()
    return torch.einsum("jh,jhk,jhv->hkv", weight, kk, vv), shifted.sum(0)


@pytest.mark.parametrize("shift", [0, 1], ids=["shift0", "shift1"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gated_local_states_and_total_decays(triton_device, monkeypatch, reverse, shift):
    """With per-token gates (g + g_gamma): every segment's A_s and its total log decay (log2-scaled), from the
    gates shifted by one token for the backward's shift 1 (none at each sequence's first token)."""
    split_all_sequences(monkeypatch)
    bounds = (0, 150, 150, 170, 300)
    H, K, V = 2, 24, 40
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(bounds[-1], H, d, generator=gen) for d in (K, V))
    g_gamma = torch.tensor([-0.05, -1.0])
    gates = torch.nn.functional.logsigmoid(2 * torch.randn(bounds[-1], H, generator=gen))
    plan = _common.plan_segments(bounds, H, torch.device(triton_device))
    got = local_states(k.to(triton_device), v.to(triton_device), g_gamma.to(triton_device), plan, k_scale=0.5,
                       reverse=reverse, gates=gates.to(triton_device), shift=shift)  # fmt: skip
    states, totals = got.states.cpu(), got.totals.cpu()
    for s, (start, end, _, flags) in enumerate(plan.segments.cpu().tolist()):
        if flags & (1 if reverse else 2):  # last in scan order: not computed (no scan reads it)
            continue
        first = bool(flags & (2 if reverse else 1))
        want, total = _gated_local_state(k, v, gates + g_gamma, start, end, 0.5, reverse, first, shift)
        torch.testing.assert_close(states[s].double(), want, rtol=1e-5, atol=1e-5, msg=f"segment {s}")
        torch.testing.assert_close(totals[s].double() / 1.4426950408889634, total, rtol=1e-6, atol=1e-6)
