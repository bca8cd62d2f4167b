"""The chunked Triton engine with per-token gates g [B, T, H] (engines/triton/chunk.py, chunk_gates.py): forward,
every gradient and dg, at engine level (TritonChunkEngine.forward / backward with ``g``), against the float64
reference (lightning_attention.reference).

Tolerance (lightning_attention.testing): each result's error against float64 is at most twice that of plain torch
in the inputs' dtype on the same inputs -- the chunked reference with its compute dtype pinned to that dtype --
plus the float32 floor of tests/engines/triton/test_chunk.py. For dg in 16-bit dtypes the same-dtype torch
baseline is the engines' own formula (docs/DESIGN.md: dg_t = sum over s at or after t of q_s . dq_s - k_s . dk_s,
plus <S_T, dht>) on that baseline's gradients: the engine sums per-token terms over the whole sequence, whose
16-bit operand roundings add up in the sum, and autograd through the recurrence does not sum them (fp16, T = 150,
random gates: engine 3.3e-3, formula 1.1e-2, autograd 5.1e-4). Where that formula cancels (gates of -20: its
terms are O(1), dg ~1e-9 of them) the baseline is the same-dtype autograd dg. bfloat16 under the interpreter rounds
as the GPU does (rounding.interpreter_rounds_bf16_to_nearest). float16 with gates of -20 is not tested: exp(-20)
is below float16's range, so every 16-bit operand carrying a decayed pair is zero (the kernels' and torch's).

Paths (what each case runs): the scans' pointer and TMA loads, K up to 256 (two K halves), K != V, split
sequences (local states and their total decays, the segments' dg sums), the paired dv/dk launch, two unpaired
scans, the fused dk/dv kernel, varlen with empty and length-1 sequences, reverse, h0 and dht, g alone and with
g_gamma, gates of -20 and of 0.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lightning_attention import reference  # noqa: E402
from lightning_attention._validation import ScanConfig  # noqa: E402
from lightning_attention.engines.triton import chunk as chunk_engine  # noqa: E402
from lightning_attention.engines.triton import chunk_scan  # noqa: E402
from lightning_attention.testing import assert_matches_baseline, make_inputs  # noqa: E402
from tests.engines.triton.rounding import interpreter_rounds_bf16_to_nearest  # noqa: E402
from tests.engines.triton.test_chunk import record_scan_launches, split_all_sequences, use_options  # noqa: E402

G_GAMMA = (-0.05, -1.0)  # a slow and a fast head
NAMES = ("o", "final_state", "dq", "dk", "dv", "dh0", "dg")


def gates(kind: str, B: int, T: int, H: int = 2, seed: int = 11) -> torch.Tensor:
    """float32 [B, T, H] log gates: "random" log-sigmoid of N(0, 4) (most near 0, some below -4), "strong" -20 per
    token (the cumulative sum reaches -1280 in a chunk), "zero"."""
    if kind == "strong":
        return torch.full((B, T, H), -20.0)
    if kind == "zero":
        return torch.zeros(B, T, H)
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.logsigmoid(2 * torch.randn(B, T, H, generator=gen, dtype=torch.float64)).float()


def _upstream(o_shape, final_shape, dtype, with_dht, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o_shape, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(final_shape, generator=gen, dtype=torch.float64).float() if with_dht else None
    return do, dht


def _engine(inputs, g_gamma, g, cu, reverse, do, dht, device):
    """The Triton engine's (o, final, dq, dk, dv, dh0, dg) on ``device``, back on the CPU."""
    q, k, v, h0 = (None if t is None else t.to(device) for t in inputs)
    cfg = ScanConfig(scale=q.shape[-1] ** -0.5, reverse=reverse, output_final_state=True)
    args = (q, k, v, g_gamma.to(device), cfg, h0, None if cu is None else cu.to(device))
    o, final = chunk_engine.ENGINE.forward(*args, g=g.to(device))
    dht_d = None if dht is None else dht.to(device)
    grads = chunk_engine.ENGINE.backward(*args, do.to(device), dht_d, g=g.to(device))
    return tuple(None if t is None else t.cpu() for t in (o, final, *grads))


def _torch(inputs, g_gamma, g, cu, reverse, do, dht, dtype, monkeypatch):
    """The chunked reference computing in ``dtype`` (float64: the truth), gradients by autograd."""
    leaves = [None if t is None else t.detach().to(dtype if i < 3 else torch.promote_types(dtype, t.dtype))
              for i, t in enumerate(inputs)]  # fmt: skip
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    g_leaf = g.to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(reference, "_compute_dtype", lambda *tensors: dtype)
        o, final = reference.chunk_reference(*leaves[:3], g_gamma, leaves[0].shape[-1] ** -0.5, leaves[3], True,
                                             reverse, cu, g=g_leaf)  # fmt: skip
    loss = (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (final.double() * dht.double()).sum()
    wrt = [t for t in (*leaves, g_leaf) if t is not None]
    grads = list(torch.autograd.grad(loss, wrt))
    dh0 = grads.pop(3) if leaves[3] is not None else None
    return (o.detach(), final.detach(), *(t.detach() for t in grads[:3]), dh0, grads[3].detach())


def _formula_dg(q, k, dq, dk, final, dht, cu, reverse):
    """docs/DESIGN.md's dg from complete gradients, in float32: per sequence and head, the sum over s at or after t
    in scan order of q_s . dq_s - k_s . dk_s, plus <final_state, dht>."""
    local = (q.float() * dq.float()).sum(-1) - (k.float() * dk.float()).sum(-1)  # [B, T, H]
    final_term = (final.float() * dht.float()).sum((-1, -2)) if dht is not None else torch.zeros(final.shape[:2])
    B, T = q.shape[:2]
    spans = [(b, 0, T, b) for b in range(B)] if cu is None else [
        (0, a, e, n) for n, (a, e) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:]))]  # fmt: skip
    dg = torch.zeros_like(local)
    for b, start, end, n in spans:
        seq = local[b, start:end]
        dg[b, start:end] = (seq.cumsum(0) if reverse else seq.flip(0).cumsum(0).flip(0)) + final_term[n]
    return dg


def check_gated(device, monkeypatch, *, dtype, B, T, K, V, gate_kind="random", with_g_gamma=True, cu=None,
                reverse=False, h0=True, with_dht=True, H=2, names=NAMES):  # fmt: skip
    """Engine vs float64 truth, relative to the same-dtype torch baseline (module docstring); ``names``: the
    results checked."""
    if dtype == torch.bfloat16 and device == "cpu":
        interpreter_rounds_bf16_to_nearest(monkeypatch)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    num_seqs = None if cu is None else len(cu) - 1
    q, k, v, s0 = make_inputs(B, T, H, K, V, dtype=dtype, initial_state=h0, num_seqs=num_seqs, seed=T + K)
    inputs = (q, k, v, s0)
    g = gates(gate_kind, B, T, H)
    g_gamma = torch.linspace(*G_GAMMA, H) if with_g_gamma else torch.zeros(H)
    do, dht = _upstream((B, T, H, V), (len(cu) - 1 if cu else B, H, K, V), dtype, with_dht)
    got = _engine(inputs, g_gamma, g, cu_t, reverse, do, dht, device)
    base = list(_torch(inputs, g_gamma, g, cu_t, reverse, do, dht, dtype, monkeypatch))
    truth = _torch(inputs, g_gamma.double(), g, cu_t, reverse, do, dht, torch.float64, monkeypatch)
    if dtype != torch.float32 and gate_kind != "strong":
        base[6] = _formula_dg(q, k, base[2], base[3], base[1], dht, cu_t, reverse)
    for name, a, b, r in zip(NAMES, got, base, truth):
        if name not in names:
            continue
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and a.dtype == (dtype if name in ("o", "dq", "dk", "dv") else torch.float32), name
        assert torch.isfinite(a).all(), name
        assert_matches_baseline(a, r, b, name=name, floor=1e-5)


#: dk/dv routes with gates: the paired scans for equal heads, two scans for others, the fused kernel (heads up to
#: 64; options.TritonOptions.fused_dkdv_with_gates) where a case says "fused"
CASES = [
    pytest.param(dict(dtype=torch.float32, B=1, T=150, K=16, V=24, cu=[0, 0, 1, 70, 150, 150], fused=True),
                 id="fp32-fused-varlen-empty-len1"),
    pytest.param(dict(dtype=torch.float32, B=1, T=150, K=80, V=80, cu=[0, 70, 70, 150], reverse=True, split=True),
                 id="fp32-paired-varlen-reverse-split"),
    pytest.param(dict(dtype=torch.bfloat16, B=2, T=100, K=24, V=40, with_g_gamma=False, reverse=True, split=True,
                      fused=True), id="bf16-fused-g-alone-reverse-split"),
    pytest.param(dict(dtype=torch.float16, B=1, T=150, K=72, V=40, gate_kind="zero", cu=[0, 64, 65, 150]),
                 id="fp16-two-scans-g0-varlen"),
    pytest.param(dict(dtype=torch.float32, B=1, T=150, K=80, V=80, gate_kind="strong", cu=[0, 1, 90, 150],
                      split=True), id="fp32-strong-paired-split"),
    pytest.param(dict(dtype=torch.bfloat16, B=2, T=100, K=16, V=24, gate_kind="strong", h0=False, with_dht=False),
                 id="bf16-strong-two-scans-no-h0-no-dht"),
    pytest.param(dict(dtype=torch.float32, B=1, T=70, K=136, V=72, split=True), id="fp32-K136-two-halves-split"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_gated_engine_matches_reference(triton_device, monkeypatch, case):
    case = dict(case)
    if case.pop("split", False):
        split_all_sequences(monkeypatch)
    use_options(monkeypatch, fused_dkdv_with_gates=case.pop("fused", False))
    check_gated(triton_device, monkeypatch, **case)


TMA_CASES = [
    pytest.param(torch.bfloat16, 128, [0, 130, 200], True, True, "paired", id="bf16-D128-paired-varlen-reverse-split"),
    pytest.param(torch.float16, 256, [0, 0, 70, 130], False, False, "two-scans", id="fp16-D256-two-scans-varlen-empty"),
    pytest.param(torch.float32, 64, [0, 130, 200], True, True, "fused", id="fp32-D64-fused-varlen-reverse-split"),
]


@pytest.mark.parametrize("dtype, dim, cu, reverse, split, route", TMA_CASES)
def test_gated_tma_path_matches_reference(triton_device, monkeypatch, dtype, dim, cu, reverse, split, route):
    """Heads of 64, 128 and 256 with TMA on (chunk_scan.uses_tma): the gated forward, the dq scan with its running
    dg sums and the dv scan with its row dots load whole chunks through TMA boxes (x's tile too), reverse scans'
    boxes flipped against scan order; every scan launch goes through TMA (dk/dv by ``route``)."""
    if split:
        split_all_sequences(monkeypatch)
    use_options(
        monkeypatch, tma_head_dims=(64, 128, 256), tma_fp32_head_dims=(64, 128), paired_dkdv=route == "paired",
        fused_dkdv_with_gates=route == "fused",
    )
    launches = record_scan_launches(monkeypatch)
    check_gated(triton_device, monkeypatch, dtype=dtype, B=1, T=cu[-1], K=dim, V=dim, cu=cu, reverse=reverse)
    assert launches == [True] * {"fused": 2, "paired": 3, "two-scans": 4}[route]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_split_sequences_add_the_sums_of_the_segments_before(triton_device, monkeypatch, reverse):
    """chunk_gates.gate_gradient on split sequences: every token's dg is its V-blocks' dots plus the totals of the
    segments before its own in scan order, within its sequence (empty sequences and a one-segment one included)."""
    from lightning_attention.engines.triton import _common
    from lightning_attention.engines.triton.chunk_gates import gate_gradient

    split_all_sequences(monkeypatch)
    bounds, nv, H = (0, 150, 150, 170, 300), 2, 3
    plan = _common.plan_segments(bounds, H, torch.device(triton_device))
    gen = torch.Generator().manual_seed(0)
    dots = torch.randn(nv, bounds[-1], H, generator=gen)
    totals = torch.randn(plan.num_segments, nv, H, generator=gen)
    dg = gate_gradient(dots.to(triton_device), totals.to(triton_device), plan, reverse=reverse).cpu()
    want = dots.sum(0)
    segments = plan.segments.cpu().tolist()
    for s, (start, end, seq, _) in enumerate(segments):
        before = [j for j, (_, _, other, _) in enumerate(segments) if other == seq and (j > s if reverse else j < s)]
        want[start:end] += totals[before].sum((0, 1))
    assert plan.split and plan.num_segments == 8
    torch.testing.assert_close(dg, want, rtol=1e-6, atol=1e-6)
    # one segment per sequence: the V-blocks' sum alone
    whole = _common._plan(bounds, H, 1, torch.device(triton_device), 1.0)
    assert torch.equal(gate_gradient(dots, None, whole, reverse=reverse), dots.sum(0))


def test_backward_without_gates_returns_no_dg(triton_device):
    """g=None: dg is None and the other gradients are the g_gamma-only kernels' (as the op's)."""
    q, k, v, h0 = make_inputs(1, 70, 2, 16, 16, device=triton_device, initial_state=True)
    cfg = ScanConfig(scale=0.25, output_final_state=True)
    g_gamma = torch.tensor(G_GAMMA, device=triton_device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(triton_device)
    grads = chunk_engine.ENGINE.backward(q, k, v, g_gamma, cfg, h0, None, do, None)
    assert len(grads) == 5 and grads[4] is None
    zero_gates = torch.zeros(q.shape[:3], device=triton_device)
    gated = chunk_engine.ENGINE.backward(q, k, v, g_gamma, cfg, h0, None, do, None, g=zero_gates)
    for name, a, b in zip(NAMES[2:6], grads[:4], gated[:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


GPU_CASES = [
    pytest.param(dict(dtype=torch.bfloat16, B=2, T=2048, K=128, V=128, H=4, cu=None), id="bf16-D128-2x2048"),
    pytest.param(dict(dtype=torch.bfloat16, B=1, T=8192, K=128, V=128, H=2, gate_kind="strong", reverse=True,
                      names=NAMES[:-1]), id="bf16-D128-strong-reverse-split"),  # dg: the test below
    pytest.param(dict(dtype=torch.float16, B=1, T=4000, K=64, V=64, H=4, cu=[0, 0, 1, 1700, 4000], reverse=True),
                 id="fp16-D64-varlen-empty-len1-reverse"),
    pytest.param(dict(dtype=torch.float32, B=1, T=3000, K=128, V=128, H=2, cu=[0, 1000, 3000]),
                 id="fp32-D128-varlen-split"),
    pytest.param(dict(dtype=torch.bfloat16, B=1, T=1500, K=256, V=256, H=2, with_g_gamma=False), id="bf16-D256"),
    pytest.param(dict(dtype=torch.bfloat16, B=2, T=1000, K=96, V=48, H=3, gate_kind="zero", h0=False),
                 id="bf16-K96-V48-g0-no-h0"),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gated_engine_at_realistic_lengths_on_gpu(monkeypatch, case):
    """The shipped configurations on the GPU (TMA for heads of 128 and 256 on sm_90, the planner's own splits of
    long sequences over the SMs) at lengths of thousands of tokens."""
    check_gated("cuda", monkeypatch, **case)


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="docs/DESIGN.md, 'Accuracy of dg': 2.1x the baseline")
def test_gated_dg_of_a_long_sequence_with_strong_gates_on_gpu(monkeypatch):
    """dg at T = 8192 with gates of -20 (bf16): the Triton engine's running sum of row dots along the sequence
    accumulates their bf16 operand roundings, so dg's error is about twice the same-dtype baseline's here (H200:
    1.06e-1 against 5.02e-2; the other results: the GPU case above). A known shortfall, strict so that a fix
    shows."""
    check_gated("cuda", monkeypatch, dtype=torch.bfloat16, B=1, T=8192, K=128, V=128, H=2, gate_kind="strong",
                reverse=True, names=("dg",))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_backward_reuses_the_forward_local_states_and_total_decays(triton_device, monkeypatch, reverse):
    """On split sequences the forward hands its local states of (k, v) and their segments' total decays to the
    backward's dq scan (forward_saving, one tensor): the backward gives the same bits with them as without."""
    split_all_sequences(monkeypatch)
    q, k, v, h0 = make_inputs(1, 200, 2, 16, 16, device=triton_device, initial_state=True, num_seqs=2)
    cu = torch.tensor([0, 130, 200], device=triton_device)
    g = gates("random", 1, 200).to(triton_device)
    g_gamma = torch.tensor(G_GAMMA, device=triton_device)
    cfg = ScanConfig(scale=0.25, reverse=reverse, output_final_state=True)
    o, final, saved = chunk_engine.ENGINE.forward_saving(q, k, v, g_gamma, cfg, h0, cu, g=g)
    assert saved is not None and saved.numel() == 5 * 2 * 16 * 16 + 5 * 2  # 5 segments (of 64 tokens or fewer)
    do, dht = _upstream(o.shape, final.shape, q.dtype, True)
    args = (q, k, v, g_gamma, cfg, h0, cu, do.to(triton_device), dht.to(triton_device))
    reused = chunk_engine.ENGINE.backward(*args, g=g, saved=saved)
    again = chunk_engine.ENGINE.backward(*args, g=g)
    for a, b in zip(reused, again):
        assert torch.equal(a, b)
