"""The chunked Triton engine against the float64 reference: forward, every gradient, the serving prefill.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; on a GPU the same
tests run on the device. Tolerance (lightning_attention.testing): the engine's error against the float64
reference may be at most twice that of plain torch computing the same chunked algorithm in the same dtype
(the torch engine with its compute dtype set to the input dtype), plus a floor for float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
from triton.runtime.errors import OutOfResources

from lightning_attention import chunk_lightning_attn, chunk_simple_gla
from lightning_attention.engines.cpu import _common as torch_engine_common
from lightning_attention.engines.triton import _common as triton_common
from lightning_attention.engines.triton import chunk as chunk_engine
from lightning_attention.engines.triton import chunk_scan
from lightning_attention.engines.triton import options as triton_options
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs, rel_err

G2 = (-0.05, -1.0)  # a slow and a fast head
NAMES = ("o", "final_state", "dq", "dk", "dv", "dh0")


def use_options(monkeypatch, **changes):
    """Run the test with some of the Triton engine's routes replaced (engines/triton/options.py)."""
    monkeypatch.setattr(triton_options, "OPTIONS", dataclasses.replace(triton_options.OPTIONS, **changes))


def split_all_sequences(monkeypatch):
    """Make the planner cut every sequence into one-chunk segments (the path used when B * H cannot fill the GPU)."""
    use_options(monkeypatch, programs_per_sm=1e6)


@pytest.fixture
def split_sequences(monkeypatch):
    split_all_sequences(monkeypatch)


def _random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def _run(inputs, g, cu_seqlens, reverse, backend, with_dht=True):
    """Forward + backward through the public op; returns (o, final, dq, dk, dv, dh0 or None)."""
    q, k, v, h0 = (None if t is None else t.detach().requires_grad_() for t in inputs)
    o, final = chunk_simple_gla(
        q, k, v, g_gamma=g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, reverse=reverse,
        backend=backend,
    )
    loss = (o.double() * _random_like(o, 1).double()).sum()
    if with_dht:
        loss = loss + (final.double() * _random_like(final, 2).double()).sum()
    grads = torch.autograd.grad(loss, [t for t in (q, k, v, h0) if t is not None])
    return (o, final, *grads, None) if h0 is None else (o, final, *grads)


def _torch_same_dtype(inputs, g, cu_seqlens, reverse, with_dht):
    """Plain torch in the inputs' dtype: the torch engine with its compute dtype pinned to that dtype."""
    with torch_engine_common.computing_in(inputs[0].dtype):
        return _run(inputs, g, cu_seqlens, reverse, "torch", with_dht)


def _reference(inputs64, g, cu_seqlens, reverse, with_dht):
    """The definition (token loop) in float64, gradients by autograd."""
    q, k, v, h0 = (None if t is None else t.detach().requires_grad_() for t in inputs64)
    o, final = recurrent_reference(q, k, v, g, None, h0, True, reverse, cu_seqlens)
    loss = (o * _random_like(o, 1)).sum()
    if with_dht:
        loss = loss + (final * _random_like(final, 2)).sum()
    grads = torch.autograd.grad(loss, [t for t in (q, k, v, h0) if t is not None])
    return (o, final, *grads, None) if h0 is None else (o, final, *grads)


def _check_against_reference(inputs, g, cu_seqlens, reverse, with_dht=True):
    device = inputs[0].device
    g = torch.tensor(g, dtype=torch.float32)
    got = _run(inputs, g.to(device), cu_seqlens, reverse, "triton", with_dht)
    base = _torch_same_dtype(inputs, g.to(device), cu_seqlens, reverse, with_dht)
    inputs64 = tuple(None if t is None else t.detach().double().cpu() for t in inputs)
    cu64 = None if cu_seqlens is None else cu_seqlens.cpu()
    ref = _reference(inputs64, g.double(), cu64, reverse, with_dht)
    for name, a, b, r in zip(NAMES, got, base, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape, name
        assert_matches_baseline(a.cpu(), r, b.cpu(), name=name, floor=1e-5)


CASES = [
    pytest.param(2, 100, 16, 32, False, None, torch.float32, id="fp32-T100-K16-V32"),
    pytest.param(2, 100, 16, 32, True, None, torch.float32, id="fp32-reverse"),
    pytest.param(1, 150, 24, 40, False, [0, 0, 70, 71, 150, 150], torch.float32, id="fp32-varlen-empty-K24-V40"),
    pytest.param(1, 150, 40, 24, True, [0, 64, 64, 150], torch.bfloat16, id="bf16-varlen-reverse-K40-V24"),
    pytest.param(2, 80, 32, 16, False, None, torch.float16, id="fp16-K32-V16"),
]


@pytest.mark.parametrize("B, T, K, V, reverse, cu, dtype", CASES)
def test_matches_reference(triton_device, B, T, K, V, reverse, cu, dtype):
    num_seqs = None if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, 2, K, V, dtype=dtype, device=triton_device, initial_state=True, num_seqs=num_seqs)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=triton_device)
    _check_against_reference(inputs, G2, cu_seqlens, reverse)


@pytest.mark.parametrize(
    "B, T, cu, reverse",
    [
        pytest.param(1, 200, None, False, id="dense"),
        pytest.param(1, 300, [0, 0, 130, 131, 300], True, id="varlen-empty-reverse"),
    ],
)
def test_split_sequences_match_reference(triton_device, split_sequences, B, T, cu, reverse):
    """Segments of 64 tokens: local states, the scan across segments, and the per-segment scans."""
    num_seqs = None if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, 2, 16, 24, device=triton_device, initial_state=True, num_seqs=num_seqs)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=triton_device)
    _check_against_reference(inputs, G2, cu_seqlens, reverse)


#: dk, dv routes of the backward: (fused kernel, paired scans). Small heads take the fused kernel, equal larger
#: heads the scan and its transposed twin in one launch, others two scans.
DKDV_ROUTES = {"fused": (True, True), "paired": (False, True), "two-scans": (False, False)}


@pytest.mark.parametrize("split", [pytest.param(False, id="whole"), pytest.param(True, id="split")])
@pytest.mark.parametrize("route", list(DKDV_ROUTES))
def test_every_dkdv_route_matches_reference(triton_device, monkeypatch, route, split):
    """Each dk/dv route, forced at one shape (K = V, so that all three apply), against the reference: varlen with
    an empty sequence, reverse, initial state, whole sequences or split into segments."""
    fused, paired = DKDV_ROUTES[route]
    monkeypatch.setattr(chunk_engine, "use_fused_dkdv", lambda dk, dv, gated=False: fused)
    use_options(monkeypatch, paired_dkdv=paired)
    if split:
        split_all_sequences(monkeypatch)
    launches = []
    real_scan = chunk_engine.scan
    monkeypatch.setattr(chunk_engine, "scan", lambda *a, **kw: launches.append(kw["transposed"]) or real_scan(*a, **kw))
    cu = [0, 70, 70, 150]
    inputs = make_inputs(1, 150, 2, 40, 40, device=triton_device, initial_state=True, num_seqs=len(cu) - 1)
    _check_against_reference(inputs, G2, torch.tensor(cu, device=triton_device), True)
    scans_with_twin = sum(t is not None for t in launches)
    expected = {"fused": (2, 0), "paired": (3, 1), "two-scans": (4, 0)}  # scans: forward, dq, then dk/dv's
    assert (len(launches), scans_with_twin) == expected[route]


@pytest.mark.parametrize(
    "K, V, cu, reverse, eager_passes",
    [
        # local-state passes (their DK): the forward's of (k, v); the backward's dq scan's of (v, k) unless
        # reused; the fused dk/dv kernel's of (q, do), or the two dk, dv scans' of (q, do) and (do, q)
        pytest.param(16, 24, None, False, (16, 16), id="K16-V24"),
        pytest.param(64, 64, [0, 130, 130, 200], True, (64, 64), id="K64-varlen-empty-reverse"),
        pytest.param(72, 40, None, False, (72, 40, 72, 40), id="K72-V40-other-segments"),
    ],
)
def test_backward_reuses_the_forward_local_states(triton_device, monkeypatch, K, V, cu, reverse, eager_passes):
    """On split sequences the dq scan = scan(do, v, k) needs the transposes of the forward's local states: the
    eager op keeps them from the forward (one local-state pass fewer), the custom op of torch.compile computes them
    again as the forward did, and both give the same bits. Where the dq scan plans other segments (K and V with
    different numbers of V-blocks) it computes its own."""
    from lightning_attention.engines.triton import chunk_state
    from lightning_attention.ops import chunk_scan_op

    split_all_sequences(monkeypatch)
    passes = []
    _intercept_launches(monkeypatch, chunk_state, "_local_state_kernel", lambda kwargs: passes.append(kwargs["DK"]))
    num_seqs = None if cu is None else len(cu) - 1
    inputs = make_inputs(1, 200, 2, K, V, device=triton_device, initial_state=True, num_seqs=num_seqs)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=triton_device)
    g = torch.tensor(G2, device=triton_device)
    q, k, v, h0 = (t.detach().requires_grad_() for t in inputs)
    do = _random_like(torch.empty(*q.shape[:3], V, dtype=q.dtype, device=q.device), 1)
    results = {}
    for path in ("eager", "custom op"):
        passes.clear()
        if path == "eager":
            o, final = chunk_simple_gla(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True,
                                        cu_seqlens=cu_seqlens, reverse=reverse, backend="triton")  # fmt: skip
        else:
            o, final = chunk_scan_op(q, k, v, None, g, h0, cu_seqlens, None, K**-0.5, reverse, 64, True, "triton")
        grads = torch.autograd.grad((o, final), (q, k, v, h0), (do, torch.ones_like(final)))
        results[path] = (o, final, *grads, list(passes))
    assert tuple(results["eager"][-1]) == eager_passes
    reused = len(eager_passes) == 2
    # (the custom op computes the dq scan's states as the forward did: a pass of (k, v) again)
    assert tuple(results["custom op"][-1]) == ((K, K, K) if reused else eager_passes)
    for name, a, b in zip(NAMES, results["eager"][:-1], results["custom op"][:-1]):
        assert torch.equal(a, b), name
    _check_against_reference(inputs, G2, cu_seqlens, reverse)


def _intercept_launches(monkeypatch, module, name: str, hook) -> None:
    """Patch the Triton kernel ``module.name`` so that ``hook(launch kwargs)`` runs before each launch (a hook
    that raises stands for a launch the GPU refused)."""
    kernel = getattr(module, name)

    class Intercepted:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                hook(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Intercepted())


def intercept_scans(monkeypatch, hook) -> None:
    """_intercept_launches for both scan kernels, with ``hook(through TMA, launch kwargs)``."""
    for name in ("_scan_kernel", "_scan_tma_kernel"):
        _intercept_launches(monkeypatch, chunk_scan, name, lambda kwargs: hook("TMA_STAGES" in kwargs, kwargs))


def record_scan_launches(monkeypatch) -> list[bool]:
    """Patch chunk_scan's kernels to record whether each launch runs through TMA; returns the list it fills."""
    launches = []
    intercept_scans(monkeypatch, lambda tma, kwargs: launches.append(tma))
    return launches


@pytest.mark.parametrize(
    "dtype, dim, cu, reverse, split, paired",
    [
        pytest.param(torch.bfloat16, 64, None, False, False, True, id="bf16-dense"),
        pytest.param(torch.float16, 64, [0, 0, 70, 130, 250], False, False, True, id="fp16-varlen-empty"),
        pytest.param(torch.bfloat16, 64, [0, 100, 250], False, True, True, id="bf16-varlen-split"),
        pytest.param(torch.bfloat16, 64, None, True, False, True, id="bf16-reverse"),
        pytest.param(torch.bfloat16, 128, [0, 0, 70, 200], False, False, True, id="bf16-D128-varlen-empty"),
        pytest.param(torch.bfloat16, 128, [0, 130, 200], True, True, True, id="bf16-D128-varlen-reverse-split"),
        pytest.param(torch.float16, 128, [0, 130, 200], False, True, False, id="fp16-D128-split-unpaired"),
        pytest.param(torch.bfloat16, 128, None, True, False, False, id="bf16-D128-reverse-unpaired"),
        pytest.param(torch.bfloat16, 256, [0, 130, 200], True, True, True, id="bf16-D256-varlen-reverse-split"),
        pytest.param(torch.float16, 256, None, False, False, False, id="fp16-D256-unpaired"),
        pytest.param(torch.float32, 128, [0, 130, 200], True, True, True, id="fp32-D128-varlen-reverse-split"),
        pytest.param(torch.float32, 128, [0, 0, 70, 200], False, False, False, id="fp32-D128-varlen-empty-unpaired"),
        pytest.param(torch.float32, 64, [0, 130, 200], True, True, True, id="fp32-D64-varlen-reverse-split"),
    ],
)
def test_tma_path_matches_reference(triton_device, monkeypatch, dtype, dim, cu, reverse, split, paired):
    """Heads of exactly 64, 128 or 256 with TMA on: whole chunks load through TMA boxes (a reverse scan's box in
    memory order, its decays flipped), each segment's partial chunk is peeled off with the rows outside the
    segment zeroed. D = 64: the forward and dq scans (dk, dv: the fused kernel); D = 128 and 256 (two K halves,
    two boxes per row block): also dv and its transposed twin dk (descriptors of k and v swapped), in one launch
    or (``paired`` off) two."""
    if split:
        split_all_sequences(monkeypatch)
    use_options(monkeypatch, tma_head_dims=(64, 128, 256), tma_fp32_head_dims=(64, 128))
    use_options(monkeypatch, paired_dkdv=paired)
    launches = record_scan_launches(monkeypatch)
    num_seqs = None if cu is None else len(cu) - 1
    B, T = (2, 150) if cu is None else (1, cu[-1])
    inputs = make_inputs(B, T, 2, dim, dim, dtype=dtype, device=triton_device, initial_state=True, num_seqs=num_seqs)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=triton_device)
    _check_against_reference(inputs, G2, cu_seqlens, reverse)
    scans = 2 if dim == 64 else (3 if paired else 4)
    assert launches == [True] * scans  # every scan of the forward and backward went through TMA


@pytest.mark.parametrize("split", [pytest.param(False, id="whole"), pytest.param(True, id="split")])
@pytest.mark.parametrize("dim", [pytest.param(64, id="D64-fused-dkdv"), pytest.param(128, id="D128-paired-tma")])
def test_fp32_under_one_pass_tf32_rounds_operands_to_nearest(triton_device, monkeypatch, dim, split):
    """torch.set_float32_matmul_precision("high"): one TF32 product per dot, its operands rounded to nearest
    (_common.tf32_operand) in every kernel: the scans (o, dq), the dk/dv kernels, the local states (split).
    Each result's error against float64 is TF32's: below 2^-10 (two roundings of 2^-11 along the chain
    operand -> state -> output; 4-6e-4 measured on H100 at T = 8192) and far above fp32's (~1e-7, the error
    without rounding under the interpreter, whose products are exact)."""
    if split:
        split_all_sequences(monkeypatch)
    use_options(monkeypatch, tma_fp32_head_dims=(64, 128))
    inputs = make_inputs(2, 150, 2, dim, dim, dtype=torch.float32, device=triton_device, initial_state=True)
    g = torch.tensor(G2, dtype=torch.float32)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = _run(inputs, g.to(triton_device), None, False, "triton")
    finally:
        torch.set_float32_matmul_precision(precision)
    ref = _reference(tuple(t.detach().double().cpu() for t in inputs), g.double(), None, False, True)
    for name, a, r in zip(NAMES, got, ref):
        assert 2.0**-16 < rel_err(a.cpu(), r) < 2.0**-10, name


@pytest.mark.parametrize("split", [pytest.param(False, id="whole"), pytest.param(True, id="split")])
def test_tma_path_needs_aligned_outputs(triton_device, monkeypatch, split):
    """Outputs leave through TMA stores, whose base must be 16-byte aligned: a scan into a misaligned view of
    memory runs the pointer path, with the same result."""
    if split:
        split_all_sequences(monkeypatch)
    launches = record_scan_launches(monkeypatch)
    q, k, v, _ = make_inputs(1, 150, 2, 128, 128, dtype=torch.bfloat16, device=triton_device)
    q, k, v = (t.reshape(150, 2, 128) for t in (q, k, v))
    g = torch.tensor(G2, device=triton_device)
    outs = []
    for offset in (0, 1):  # elements of 2 bytes: offset 1 misaligns the base
        out = torch.empty(150 * 2 * 128 + offset, dtype=q.dtype, device=triton_device)[offset:].view(150, 2, 128)
        # (the engine's scan, which adds the local states where the plan splits the sequence, as on a GPU)
        chunk_engine._scan(q, k, v, out, g, (0, 150), scale=0.1, reverse=False, shift=0, state_in=None)
        outs.append(out)
    assert launches == [True, False]
    # Same products in the same order; compiled, the two paths' schedules may round a few outputs differently
    # (by one bf16 ulp, where the norm-wise error stays far below 1e-3).
    assert rel_err(outs[1], outs[0]) < 1e-3


def test_scan_falls_back_to_launches_that_fit_shared_memory(triton_device, monkeypatch):
    """Where a GPU has less shared memory per block than the H100 the configurations were tuned on (consumer
    Blackwell: 99 KiB; B200 for the fp32 TMA scan), loading the tuned kernel raises OutOfResources before it
    runs: the scan moves on to pointer loads with fewer stages, with the same results, and later scans of the
    same shape start from the variant that fit. Simulated: only pointer launches of <= 2 stages "fit"."""
    monkeypatch.setattr(triton_common, "_FIRST_FITTING", {})
    launches = []

    def small_shared_memory(tma, kwargs):
        variant = (tma, kwargs["num_stages"])
        launches.append(variant)
        if variant != (False, 2) and variant != (False, 1):
            raise OutOfResources(200_000, 101_376, "shared memory")

    intercept_scans(monkeypatch, small_shared_memory)
    inputs = make_inputs(1, 150, 2, 128, 128, dtype=torch.bfloat16, device=triton_device, initial_state=True)
    _check_against_reference(inputs, G2, None, False)
    # forward, dq, and the paired dk/dv: the unpaired key tries TMA and 3 stages once, the paired key too
    assert launches == [(True, 3), (False, 3), (False, 2), (False, 2), (True, 3), (False, 3), (False, 2)]


def test_every_kernel_falls_back_to_one_stage(triton_device, monkeypatch):
    """The local-state pass and the fused dk/dv kernel fall back like the scans: here only one-stage pointer
    launches "fit" (split sequences, heads of 64: the op runs all three kernels)."""
    from lightning_attention.engines.triton import chunk_bwd, chunk_state

    monkeypatch.setattr(triton_common, "_FIRST_FITTING", {})
    split_all_sequences(monkeypatch)
    stages = {}

    def one_stage_only(name, kwargs):
        stages.setdefault(name, []).append(kwargs["num_stages"])
        if kwargs["num_stages"] > 1 or "TMA_STAGES" in kwargs:
            raise OutOfResources(150_000, 101_376, "shared memory")

    intercept_scans(monkeypatch, lambda tma, kwargs: one_stage_only("scan", kwargs))
    kernels = ((chunk_state, "_local_state_kernel"), (chunk_bwd, "_dkdv_kernel"))
    for module, name in kernels:
        _intercept_launches(monkeypatch, module, name, functools.partial(one_stage_only, name))
    inputs = make_inputs(1, 150, 2, 64, 64, dtype=torch.bfloat16, device=triton_device, initial_state=True)
    _check_against_reference(inputs, G2, None, False)
    assert sorted(stages) == sorted(["scan", *(name for _, name in kernels)])
    for name, tried in stages.items():
        assert tried[0] > 1 and tried[-1] == 1, (name, tried)  # the tuned depth first, one stage in the end


def test_scan_reraises_when_no_launch_fits(triton_device, monkeypatch):
    monkeypatch.setattr(triton_common, "_FIRST_FITTING", {})

    def nothing_fits(tma, kwargs):
        raise OutOfResources(300_000, 1_024, "shared memory")

    intercept_scans(monkeypatch, nothing_fits)
    q, k, v, _ = make_inputs(1, 70, 2, 64, 64, device=triton_device)
    with pytest.raises(OutOfResources):
        chunk_simple_gla(q, k, v, g_gamma=torch.tensor(G2, device=triton_device), backend="triton")


def test_tma_boxes_never_carry_the_next_sequence_into_this_one(triton_device, monkeypatch):
    """A TMA box of a sequence's partial last chunk reaches into the next sequence's rows: NaN there must not
    reach this sequence's outputs or final state (its k, v rows are zeroed, never multiplied by zero)."""
    use_options(monkeypatch, tma_head_dims=(64, 128))
    cu = torch.tensor([0, 70, 150], dtype=torch.int32, device=triton_device)
    q, k, v, _ = make_inputs(1, 150, 2, 64, 64, dtype=torch.bfloat16, device=triton_device)
    g = torch.tensor(G2, device=triton_device)
    alone, alone_final = chunk_simple_gla(
        q[:, :70], k[:, :70], v[:, :70], g_gamma=g, output_final_state=True, backend="triton"
    )
    for t in (q, k, v):
        t[:, 70:] = float("nan")
    o, final = chunk_simple_gla(q, k, v, g_gamma=g, output_final_state=True, cu_seqlens=cu, backend="triton")
    assert torch.equal(o[:, :70], alone) and torch.equal(final[0], alone_final[0])


@pytest.mark.parametrize("split", [pytest.param(False, id="whole"), pytest.param(True, id="split")])
@pytest.mark.parametrize("dv", [pytest.param(72, id="V72"), pytest.param(136, id="V136-paired")])
def test_large_heads(triton_device, monkeypatch, split, dv):
    """K=136 pads to 256: the scans hold K as two halves, and dk, dv come from two scans (K != V) or a scan and
    its transposed twin (K == V) instead of one kernel."""
    if split:
        split_all_sequences(monkeypatch)
    inputs = make_inputs(1, 70, 2, 136, dv, device=triton_device, initial_state=True)
    _check_against_reference(inputs, G2, None, False)


def test_head_dims_above_256_fall_back_to_torch(triton_device):
    inputs = make_inputs(1, 20, 1, 264, 16, device=triton_device, initial_state=True)
    _check_against_reference(inputs, G2[:1], None, False)


def test_without_initial_state_or_dht(triton_device):
    q, k, v, _ = make_inputs(2, 65, 2, 16, 16, device=triton_device)
    _check_against_reference((q, k, v, None), G2, None, False, with_dht=False)


def test_final_state_under_strongest_decay_with_partial_chunk(triton_device):
    """T=100 (a 36-token partial chunk), H=4, layer 2 of 8 ("tnl"): lam^64 underflows for the last head;
    the final state must stay finite and exact (a widely used kernel returns NaN here)."""
    q, k, v, h0 = make_inputs(1, 100, 4, 32, device=triton_device, initial_state=True)
    o, final = chunk_lightning_attn(q, k, v, 2, 8, initial_state=h0, output_final_state=True, backend="triton")
    args64 = [t.double().cpu() for t in (q, k, v)]
    g = torch.tensor([-(8 / 4) * (1 - 2 / 8) * h for h in range(4)], dtype=torch.float64)
    ref_o, ref_final = recurrent_reference(*args64, g, None, h0.double().cpu(), True)
    assert torch.isfinite(final).all() and torch.isfinite(o).all()
    assert rel_err(final.cpu(), ref_final) < 1e-5 and rel_err(o.cpu(), ref_o) < 1e-5


def test_decay_underflow_never_makes_nan(triton_device):
    """g = -1000: every lam^n underflows to 0 and lam^(-n) would be inf; masks must select, not multiply."""
    q, k, v, h0 = make_inputs(1, 70, 1, 16, device=triton_device, initial_state=True, requires_grad=True)
    g = torch.tensor([-1000.0], device=triton_device)
    o, final = chunk_simple_gla(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True, backend="triton")
    (o.sum() + final.sum()).backward()
    for t in (o, final, q.grad, k.grad, v.grad, h0.grad):
        assert torch.isfinite(t).all()
    # With lam = 0 each token sees only itself: o_t = scale * (q_t . k_t) v_t.
    expected = 16**-0.5 * (q * k).sum(-1, keepdim=True) * v
    assert rel_err(o.detach(), expected.detach()) < 1e-5


@pytest.mark.parametrize("chunk_size", [pytest.param(16, id="C16"), pytest.param(128, id="C128")])
def test_other_chunk_sizes_give_the_same_result(triton_device, chunk_size):
    q, k, v, h0 = make_inputs(1, 80, 2, 16, device=triton_device, initial_state=True)
    g = torch.tensor(G2, device=triton_device)
    kwargs = dict(g_gamma=g, initial_state=h0, output_final_state=True, backend="triton")
    o, final = chunk_simple_gla(q, k, v, chunk_size=chunk_size, **kwargs)
    o64, final64 = chunk_simple_gla(q, k, v, chunk_size=64, **kwargs)
    assert torch.equal(o, o64) and torch.equal(final, final64)


@pytest.mark.gpu
@pytest.mark.slow
def test_no_decay_head_over_a_million_tokens_is_finite_in_bf16():
    """Head 0 of "tnl" has g = 0: the state only grows. 2^20 tokens in bf16 must stay finite and accurate."""
    T = 1 << 20
    q, k, v, _ = make_inputs(1, T, 2, 64, dtype=torch.bfloat16, device="cuda")
    o, final = chunk_lightning_attn(q, k, v, 0, 8, output_final_state=True, backend="triton")
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    ref_final = torch.einsum("tk,tv->kv", k[0, :, 0].double(), v[0, :, 0].double())  # g = 0: a plain sum
    assert rel_err(final[0, 0], ref_final) < 1e-3


_FIRST_BACKWARD_WITH_TMA = """
import torch
from lightning_attention import chunk_lightning_attn
from lightning_attention.engines.triton import chunk_scan
q, k, v = (torch.randn(1, 1000, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
assert chunk_scan.uses_tma(*(t.detach()[0] for t in (q, k, v)))  # heads of 128 load through TMA by default
o, _ = chunk_lightning_attn(q, k, v, 2, 8, backend="triton")
o.float().square().sum().backward()  # the dq scan: the autograd worker thread's first TMA launch
torch.cuda.synchronize()
assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
"""


@pytest.mark.gpu
def test_tma_first_backward_in_a_fresh_process():
    """A process's first backward launches TMA kernels from PyTorch's autograd worker thread, which has no Triton
    allocator for the descriptors' scratch (_common.descriptor_scratch gives one) and, with host-built
    descriptors, no current CUDA context ("Failed to create tensor map descriptor: invalid device context").
    A fresh process, so that no earlier kernel has prepared that thread."""
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "LIGHTNING_ATTENTION_TMA"}
    proc = subprocess.run([sys.executable, "-c", _FIRST_BACKWARD_WITH_TMA], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
