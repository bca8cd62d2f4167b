"""Helpers of the chunked engine (engines/triton/_common.py): the segment planner (when and how sequences are
split), the scratch allocator of in-kernel TMA descriptors, the launch fallback and the TF32 operand rounding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lightning_attention.engines.triton import _common  # noqa: E402

H100_SMS = 132


def _plan(bounds, programs_per_segment, sms=H100_SMS):
    return _common._plan(tuple(bounds), programs_per_segment, sms, torch.device("cpu"), 1.0)


def _dense(batch, seq_len):
    return [b * seq_len for b in range(batch + 1)]


def test_enough_programs_means_no_split():
    plan = _plan(_dense(4, 8192), 32 * 2)  # 4 x 32 heads x 2 V-blocks = 256 programs
    assert not plan.split and plan.num_segments == 4


@pytest.mark.parametrize("seq_len", [32768, 131072])
def test_long_sequence_fills_one_wave(seq_len):
    """1 x T x 8 heads x 2 V-blocks: as many equal segments as fit one wave (8 x 16 = 128 programs <= 132)."""
    plan = _plan(_dense(1, seq_len), 16)
    seg = plan.segments.tolist()
    assert plan.split and plan.num_segments == 8
    assert {end - start for start, end, _, _ in seg} == {seq_len // 8}
    assert seg[0][0] == 0 and seg[-1][1] == seq_len
    assert [flags for *_, flags in seg] == [1] + [0] * 6 + [2]


def test_split_only_when_it_at_least_halves_the_walk():
    assert _plan(_dense(1, 8192), 64).num_segments == 2  # 64 programs: two segments of 64 chunks fill 128 SMs
    assert not _plan(_dense(1, 8192), 100).split  # one segment per wave: nothing to gain


def test_varlen_segments_cover_every_sequence_in_order():
    bounds = [0, 0, 5000, 5100, 40000]
    plan = _plan(bounds, 16)
    seg = plan.segments.tolist()
    offsets = plan.seq_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == plan.num_segments == len(seg)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = seg[offsets[n] : offsets[n + 1]]
        assert len(rows) >= 1 and all(s == n for _, _, s, _ in rows)
        assert rows[0][0] == a and rows[-1][1] == b
        assert all(prev[1] == nxt[0] for prev, nxt in zip(rows, rows[1:]))
        assert rows[0][3] & 1 and rows[-1][3] & 2
    assert plan.num_segments * 16 <= 2 * H100_SMS


def test_descriptor_scratch_gives_an_allocator_only_where_none_is_set():
    """Triton's allocator is a context variable: a thread that never set one (the autograd worker) has none, so
    the launch of a kernel building TMA descriptors needs one for its duration; a caller's own stays in place."""
    from triton.runtime import _allocation

    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    with _common.descriptor_scratch(torch.device("cuda", 0)):
        assert _allocation._allocator.get() is _common._torch_scratch
    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    with _common.descriptor_scratch(torch.device("cpu")):  # the interpreter needs no scratch
        assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR

    def own(size, alignment, stream):
        raise AssertionError("not called here")

    token = _allocation._allocator.set(own)
    try:
        with _common.descriptor_scratch(torch.device("cuda", 0)):
            assert _allocation._allocator.get() is own
    finally:
        _allocation._allocator.reset(token)


def test_fitting_moves_on_from_launches_the_gpu_cannot_load(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(_common, "_FIRST_FITTING", {})
    tried = []

    def launch(key, variants):
        for attempt in _common.fitting(key, variants):
            with attempt:
                tried.append(attempt.variant)
                if attempt.variant > 2:
                    raise OutOfResources(150_000, 101_376, "shared memory")

    launch(("k", 1), [4, 3, 2, 1])
    launch(("k", 1), [4, 3, 2, 1])  # starts where the first call ended
    launch(("k", 2), [2, 1])
    assert tried == [4, 3, 2, 2, 2]
    with pytest.raises(OutOfResources):
        launch(("k", 3), [4, 3])
    with pytest.raises(ValueError, match="not a resource error"):  # other errors are not retried
        for attempt in _common.fitting(("k", 4), [2, 1]):
            with attempt:
                tried.append(attempt.variant)
                raise ValueError("not a resource error")
    assert tried == [4, 3, 2, 2, 2, 4, 3, 2]
    assert _common.fewer_stages(3) == [3, 2, 1]


@triton.jit
def _tf32_operand_kernel(x, y, N: tl.constexpr, PRECISION: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y + offsets, _common.tf32_operand(tl.load(x + offsets), PRECISION))


def _nearest_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even to 11 significant bits, from frexp (not bit tricks); inf and NaN unchanged."""
    mantissa, exponent = torch.frexp(x.double())  # |mantissa| in [0.5, 1): 11 significant bits = 2^-11 steps
    rounded = torch.ldexp(torch.round(mantissa * 2048) / 2048, exponent)
    return torch.where(torch.isfinite(x), rounded, x.double()).float()


def test_tf32_operand_rounds_to_nearest_even(triton_device):
    """The TF32 products' operands: rounded to nearest (ties to even), not truncated as the tensor cores would."""
    gen = torch.Generator().manual_seed(0)
    randoms = torch.randn(200, generator=gen) * torch.logspace(-30, 30, 200)
    tf32_values = _nearest_tf32(torch.randn(8, generator=gen))
    ties = tf32_values + torch.ldexp(torch.ones(8), torch.frexp(tf32_values)[1] - 12)  # half a TF32 step above
    edges = torch.tensor([0.0, -0.0, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2**-130, 3.4e38,
                          float("inf"), float("-inf"), float("nan")])  # fmt: skip
    x = torch.cat([edges, randoms, ties, torch.zeros(256 - len(edges) - 200 - 8)]).to(triton_device)
    rounded, untouched = torch.empty_like(x), torch.empty_like(x)
    _tf32_operand_kernel[(1,)](x, rounded, N=256, PRECISION="tf32")
    _tf32_operand_kernel[(1,)](x, untouched, N=256, PRECISION="tf32x3")
    torch.testing.assert_close(rounded.cpu(), _nearest_tf32(x.cpu()), rtol=0, atol=0, equal_nan=True)
    # ties go to the even neighbour: 1 + 2^-11 down to 1, 1 + 3 * 2^-11 up to 1 + 2^-9
    assert rounded[2:5].tolist() == [1.0, 1 + 2**-9, -1.0]
    assert torch.isnan(rounded[9]) and rounded[7:9].tolist() == [float("inf"), float("-inf")]
    torch.testing.assert_close(untouched, x, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Rows outside the tensors are never touched, whatever the offsets say (the host checks them where it reads them;
# these tests bypass that check and hand the kernels bad offsets directly).

GUARD = 1 << 15  # elements before and after each tensor: more than the bad offsets below reach


def _guarded(shape, fill, dtype=torch.float32):
    """A tensor of ``shape`` in the middle of a buffer whose GUARD elements on each side hold NaN: a read of
    them poisons a result, a write changes them."""
    n = int(torch.Size(shape).numel())
    buf = torch.full((GUARD + n + GUARD,), float("nan"), dtype=dtype)
    inner = buf[GUARD : GUARD + n].view(shape)
    inner.copy_(fill)
    return buf, inner


def _guards_intact(buf):
    return bool(torch.isnan(buf[:GUARD]).all()) and bool(torch.isnan(buf[-GUARD:]).all())


BAD_SEGMENTS = [
    pytest.param([(0, 5, 0, 3), (5, 900, 1, 3)], id="end-past-rows"),
    pytest.param([(-7, 6, 0, 3), (6, 12, 1, 3)], id="negative-start"),
    pytest.param([(0, 9, 0, 3), (9, 4, 1, 3)], id="decreasing"),
]


@pytest.mark.parametrize("segments", BAD_SEGMENTS)
@pytest.mark.parametrize("kernel", ["scan", "dkdv", "local_states", "scan_gated", "dkdv_gated", "local_states_gated"])
def test_chunk_kernels_clamp_rows_to_the_tensors(triton_device, segments, kernel):
    """(``*_gated``: with per-token gates, the backward's shifted ones (the token before in scan order), and the
    row dots of dg.)"""
    from lightning_attention.engines.triton import chunk_bwd, chunk_scan, chunk_state

    if triton_device != "cpu":
        pytest.skip("guard buffers are checked on the interpreter's host memory")
    R, Hh, D = 12, 2, 16
    gen = torch.Generator().manual_seed(0)
    bufs, (q, k, v, do) = zip(*(_guarded((R, Hh, D), torch.randn(R, Hh, D, generator=gen)) for _ in range(4)))
    out_bufs, (out, dk) = zip(*(_guarded((R, Hh, D), 0.0) for _ in range(2)))
    gate_buf, gates = _guarded((R, Hh), -torch.rand(R, Hh, generator=gen))
    dots_buf, dots = _guarded((1, R, Hh), 0.0)
    gated = dict(gates=gates) if kernel.endswith("_gated") else {}
    seg = torch.tensor(segments, dtype=torch.int32, device=q.device)
    plan = _common.SegmentPlan(seg, torch.tensor([0, 1, 2], dtype=torch.int32, device=q.device), 2, 2, False)
    g = torch.tensor([-0.1, -0.5], device=q.device)
    if kernel.startswith("scan"):
        row_dots = chunk_scan.RowDots(do, dots, 1) if gated else None
        chunk_scan.scan(q, k, v, out, g, plan, scale=1.0, reverse=bool(gated), shift=int(bool(gated)), state_in=None,
                        dots=row_dots, **gated)  # fmt: skip
    elif kernel.startswith("dkdv"):
        chunk_bwd.dkdv(q, k, v, do, dk, out, g, plan, scale=1.0, reverse=True, state_in=None,
                       dots=dots if gated else None, **gated)  # fmt: skip
    else:  # (flags 0: no segment is its sequence's last, which the pass would skip)
        seg[:, 3] = 0
        states = chunk_state.local_states(k, v, g, plan, reverse=bool(gated), shift=int(bool(gated)), **gated)
        assert bool(torch.isfinite(states.states).all())
        assert not gated or bool(torch.isfinite(states.totals).all())
    assert all(_guards_intact(b) for b in (*bufs, *out_bufs, gate_buf, dots_buf)), "a kernel wrote outside its tensors"
    written = [out] if kernel == "scan" else [out, dk] if kernel == "dkdv" else []
    for t in written:  # rows inside the clamped segments, computed from rows inside the tensors only
        start, end = max(segments[0][0], 0), min(max(segments[1][1], segments[1][0]), R)
        assert bool(torch.isfinite(t[start:end]).all()), "a kernel read outside its tensors"


@pytest.mark.parametrize(
    "cu_seqlens", [pytest.param([0, 5, 900], id="past-T"), pytest.param([-4, 6, 3, 12], id="negative-decreasing")]
)
def test_recurrent_kernel_clamps_device_offsets(triton_device, monkeypatch, cu_seqlens):
    """The fused recurrent kernel reads cu_seqlens on the device (no host read to check it): its rows are clamped
    to the packed tokens, so bad offsets can make wrong or missing outputs but never a read or write outside."""
    from lightning_attention.engines.triton import recurrent

    if triton_device != "cpu":
        pytest.skip("guard buffers are checked on the interpreter's host memory")
    T, Hh, D = 12, 2, 8
    gen = torch.Generator().manual_seed(1)
    bufs, (q, k, v) = zip(*(_guarded((1, T, Hh, D), torch.randn(1, T, Hh, D, generator=gen)) for _ in range(3)))
    outputs = []

    def guarded_empty_like(t, dtype=None, **kwargs):
        buf, inner = _guarded(t.shape, 0.0, dtype=dtype or t.dtype)
        outputs.append(buf)
        return inner

    monkeypatch.setattr(recurrent.torch, "empty_like", guarded_empty_like)
    cu = torch.tensor(cu_seqlens)
    final = torch.zeros(len(cu_seqlens) - 1, Hh, D, D)
    o = recurrent._launch(q, k, v, torch.tensor([-0.1, -0.5]), 1.0, None, final, shift=0, reverse=False,
                          cu_seqlens=cu)  # fmt: skip
    assert all(_guards_intact(b) for b in (*bufs, *outputs)), "the kernel wrote outside its tensors"
    assert bool(torch.isfinite(final).all()), "the kernel read outside its tensors"
    start, end = max(cu_seqlens[0], 0), min(cu_seqlens[1], T)
    assert bool(torch.isfinite(o[0, start:end]).all())
