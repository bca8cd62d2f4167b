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
    return _common._plan(tuple(bounds), programs_per_segment, sms, torch.device("cpu"), _common.SegmentPolicy())


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


def test_launch_fitting_moves_on_from_launches_the_gpu_cannot_load(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(_common, "_FIRST_FITTING", {})
    tried = []

    def launch(stages):
        tried.append(stages)
        if stages > 2:
            raise OutOfResources(150_000, 101_376, "shared memory")

    _common.launch_fitting(("k", 1), [4, 3, 2, 1], launch)
    _common.launch_fitting(("k", 1), [4, 3, 2, 1], launch)  # starts where the first call ended
    _common.launch_fitting(("k", 2), [2, 1], launch)
    assert tried == [4, 3, 2, 2, 2]
    with pytest.raises(OutOfResources):
        _common.launch_fitting(("k", 3), [4, 3], launch)
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
