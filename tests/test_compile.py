"""The ops as first-class PyTorch operators: torch.compile, torch.library.opcheck, autocast, activation
checkpointing and a plain training loop.

Equality policy: compiling, checkpointing or wrapping in autocast must not change what the engines compute. The
custom ops are opaque to the compiler, so the compiled graph calls the same engine on the same inputs as eager,
and aot_eager runs the same ATen kernels around them: results are compared *bit for bit*
(:func:`assert_identical`). Only inductor generates new code (for the elementwise ops around the op, never for
the op itself); its results are judged against the float64 reference relative to eager float32
(lightning_attention.testing's policy).

Compile tests are few and small (CI has 2 cores): aot_eager everywhere except one inductor test. The same tests
run on CUDA (``-m gpu``; benchmarks/check_gpu.sh runs them with the whole suite) for both backends there.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lightning_attention import decay, serving
from lightning_attention.ops import (
    chunk_lightning_attn,
    chunk_scan_op,
    chunk_simple_gla,
    fused_recurrent_lightning_attn,
    fused_recurrent_simple_gla,
    recurrent_scan_op,
)
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs

H, K, V = 3, 16, 8  # K != V throughout
CHUNK = 16  # T = 37 spans two full chunks and a partial one
G_GAMMA = decay.g_gamma(H, 0, 2)  # "tnl" layer 0 of 2: g = 0 (no decay), -4/3, -8/3
VARLEN = (0, 5, 5, 20, 37)  # includes an empty sequence

# (device, backend): the torch engine everywhere, the Triton engine on CUDA.
TARGETS = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cuda", "torch"), id="cuda-torch", marks=pytest.mark.gpu),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.gpu),
]


# ---------------------------------------------------------------------------------------------------------------
# Helpers (also used by tests/nn/test_layer_compile.py)


def compile_counted(fn, backend: str = "aot_eager", **options):
    """``torch.compile(fn, fullgraph=True)`` and a counter of the frames it compiled (1 = one graph, no
    recompiles). ``fullgraph=True`` makes any graph break an error."""
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, **options), counter


@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from an empty dynamo cache and empty graph-break counters, and checks that no
    graph break was recorded (fullgraph=True already fails on one; this also covers fullgraph=False)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    torch._dynamo.reset()


def run_with_grads(fn, *inputs, seed: int = 1):
    """Outputs of ``fn(*inputs)`` (a tensor or a tuple; None entries skipped) and the gradients of
    ``sum(out * w)`` with fixed random ``w`` per output, w.r.t. every input that requires grad."""
    outs = fn(*inputs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum() for o in outs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def assert_identical(actual, expected) -> None:
    """Bit-for-bit equality of two lists of tensors (dtype included)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, i=i: f"result {i}: {m}")


def _inputs(device, T=37, dtype=torch.float32, initial_state=True, varlen=False, seed=0):
    B, num_seqs = (1, len(VARLEN) - 1) if varlen else (2, None)
    q, k, v, h0 = make_inputs(
        B, T, H, K, V, dtype=dtype, device=device, seed=seed, requires_grad=True,
        initial_state=initial_state, num_seqs=num_seqs,
    )
    cu_seqlens = torch.tensor(VARLEN, device=device) if varlen else None
    return q, k, v, h0, cu_seqlens


def skip_without_engine(backend: str) -> None:
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


# ---------------------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch with dynamic
# shapes, for each op over several sample inputs.


# Sample inputs of the scan ops: h0, varlen (with an empty sequence), reverse, bf16 inputs, T above
# RECURRENT_MAX_T (the recurrent op's chunked route), per-token gates g (with dg) and a host copy of cu_seqlens.
SCAN_CASES = {
    "plain": dict(),
    "h0-final-reverse": dict(initial_state=True, final=True, reverse=True),
    "varlen-h0-final": dict(initial_state=True, final=True, varlen=True),
    "varlen-reverse-final": dict(final=True, varlen=True, reverse=True),
    "bf16-h0-final": dict(initial_state=True, final=True, dtype=torch.bfloat16),
    "long-h0": dict(initial_state=True, T=80),
    "g-h0-final": dict(initial_state=True, final=True, gates=True),
    "g-varlen-reverse-final-cpu-offsets": dict(initial_state=True, final=True, varlen=True, reverse=True, gates=True,
                                               host_offsets=True),
}


def _gates(q):
    """[B, T, H] float32 log gates for q's shape (requires grad)."""
    gen = torch.Generator().manual_seed(11)
    return F.logsigmoid(torch.randn(*q.shape[:3], generator=gen)).to(q.device).requires_grad_()


def _scan_args(case, device, backend):
    """Positional args of ``lightning_attention::{chunk,recurrent}_scan`` for one of :data:`SCAN_CASES`."""
    q, k, v, h0, cu = _inputs(
        device, T=case.get("T", 37), dtype=case.get("dtype", torch.float32),
        initial_state=case.get("initial_state", False), varlen=case.get("varlen", False),
    )
    g = _gates(q) if case.get("gates") else None
    cu_cpu = cu.cpu() if case.get("host_offsets") else None
    return (q, k, v, g, G_GAMMA.to(device), h0, cu, cu_cpu, 0.7, case.get("reverse", False), CHUNK,
            case.get("final", False), backend)  # fmt: skip


def _backward_args(fwd_args):
    """Positional args of the ``_backward`` op matching a forward sample: random do, and dht when the forward
    returned a final state."""
    q, k, v, g, g_gamma, h0, cu, cu_cpu, scale, reverse, chunk_size, final, backend = fwd_args
    gen = torch.Generator().manual_seed(2)
    num_seqs = q.shape[0] if cu is None else cu.numel() - 1
    do = torch.randn(*q.shape[:3], v.shape[-1], generator=gen).to(q)
    dht = torch.randn(num_seqs, H, K, V, generator=gen).to(q.device) if final else None
    detached = [None if t is None else t.detach() for t in (q, k, v, g, h0)]
    return (*detached[:4], g_gamma, detached[4], cu, cu_cpu, do, dht, scale, reverse, chunk_size, backend)


SCAN_OPS = [
    pytest.param(chunk_scan_op, id="chunk_scan"),
    pytest.param(recurrent_scan_op, id="recurrent_scan"),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", [pytest.param(case, id=case_id) for case_id, case in SCAN_CASES.items()])
@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan_ops(op, case, target):
    """The forward op with autograd (its test_aot_dispatch_dynamic also runs the registered backward), then the
    backward op on its own."""
    device, backend = target
    skip_without_engine(backend)
    args = _scan_args(case, device, backend)
    torch.library.opcheck(op, args)
    backward_op = getattr(torch.ops.lightning_attention, f"{op._name}_backward").default
    torch.library.opcheck(backward_op, _backward_args(args))


PUBLIC_OPS = {"chunk_scan": chunk_simple_gla, "recurrent_scan": fused_recurrent_simple_gla}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", [pytest.param(case, id=case_id) for case_id, case in SCAN_CASES.items()])
@pytest.mark.parametrize("op", SCAN_OPS)
def test_eager_path_equals_custom_op(op, case, target):
    """Eager calls of the public ops skip the custom-op dispatcher (an autograd.Function over the same engine
    calls); compiled graphs record the custom op. Both paths: identical outputs and gradients."""
    device, backend = target
    skip_without_engine(backend)
    args = _scan_args(case, device, backend)
    q, k, v, g, g_gamma, h0, cu, cu_cpu, scale, reverse, chunk_size, final, backend = args
    do, dht = _backward_args(args)[8:10]
    results = []
    for path in ("eager", "custom_op"):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, h0, g)]
        if path == "eager":
            kwargs = dict(g=leaves[4], g_gamma=g_gamma, scale=scale, initial_state=leaves[3],
                          output_final_state=final, reverse=reverse, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu,
                          backend=backend)  # fmt: skip
            if op is chunk_scan_op:
                kwargs["chunk_size"] = chunk_size
            o, state = PUBLIC_OPS[op._name.split("::")[-1]](*leaves[:3], **kwargs)
        else:
            op_chunk = chunk_size if op is chunk_scan_op else 64  # (the public recurrent op passes 64)
            o, state = op(*leaves[:3], leaves[4], g_gamma, leaves[3], cu, cu_cpu, scale, reverse, op_chunk, final,
                          backend)  # fmt: skip
        outputs, grads_out = [o], [do]
        if final:
            outputs.append(state)
            grads_out.append(dht)
        wrt = [t for t in leaves if t is not None]
        results.append([*outputs, *torch.autograd.grad(outputs, wrt, grads_out)])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_scan_ops_triton_interpreter(op, triton_device):
    """The Triton engines on CPU under TRITON_INTERPRET=1 (on CUDA when present): opcheck's schema test also
    catches an engine that writes into an input or returns one of them. One sample with h0, varlen (an empty
    sequence) and a final state: the interpreter is slow."""
    args = _scan_args(SCAN_CASES["varlen-h0-final"], triton_device, "triton")
    torch.library.opcheck(op, args)
    backward_op = getattr(torch.ops.lightning_attention, f"{op._name}_backward").default
    torch.library.opcheck(backward_op, _backward_args(args))


def _decode_samples(device, backend):
    """(positional args of ``lightning_attention::decode``): fp32 / bf16 cache, padding rows, int32/int64 ids."""
    g = G_GAMMA.to(device)
    gen = torch.Generator().manual_seed(3)
    for dtype, cache_dtype, ids in (
        (torch.float32, torch.float32, [2, 0, 4]),
        (torch.bfloat16, torch.float32, [1, -1, 3, 0]),
        (torch.float16, torch.bfloat16, [-1, 4]),
    ):
        N = len(ids)
        q, k = (torch.randn(N, H, K, generator=gen).to(device, dtype) for _ in range(2))
        v = torch.randn(N, H, V, generator=gen).to(device, dtype)
        cache = torch.randn(5, H, K, V, generator=gen).to(device, cache_dtype)
        slot_ids = torch.tensor(ids, dtype=torch.int32 if N % 2 else torch.int64, device=device)
        yield q, k, v, cache, slot_ids, g, 0.5, backend


def _prefill_samples(device, backend):
    """(positional args of ``lightning_attention::prefill``): empty sequence, fresh and continued slots."""
    g = G_GAMMA.to(device)
    gen = torch.Generator().manual_seed(4)
    q, k, v, _, cu = _inputs(device, varlen=True, initial_state=False)
    q, k, v = (x.detach() for x in (q, k, v))
    for cache_dtype in (torch.float32, torch.bfloat16):
        cache = torch.randn(6, H, K, V, generator=gen).to(device, cache_dtype)
        slot_ids = torch.tensor([5, 0, 2, 3], device=device)
        use_initial_state = torch.tensor([True, False, True, False], device=device)
        yield q, k, v, cu, cache, slot_ids, use_initial_state, g, 0.5, backend


@pytest.mark.parametrize("target", TARGETS)
def test_opcheck_serving_ops(target):
    """The decode / prefill ops mutate ``state_cache`` in place (declared ``mutates_args``); opcheck verifies the
    declaration (test_schema), the fake implementation, and that functionalization under AOT dispatch keeps the
    in-place update."""
    device, backend = target
    skip_without_engine(backend)
    for args in _decode_samples(device, backend):
        torch.library.opcheck(serving.decode_op, args)
    for args in _prefill_samples(device, backend):
        torch.library.opcheck(serving.prefill_op, args)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_serving_ops_update_the_cache(compiler, target, fresh_dynamo):
    """Compiled prefill then decode steps (fullgraph): the same outputs as eager, and the caller's cache is
    updated in place as in eager (functionalization must write the mutation back to the input)."""
    device, backend = target
    skip_without_engine(backend)
    prefill_args = next(_prefill_samples(device, backend))
    decode_args = list(_decode_samples(device, backend))[:2]
    q, k, v, cu, _, slot_ids, use_initial_state, g = prefill_args[:8]
    initial_cache = torch.randn(6, H, K, V, generator=torch.Generator().manual_seed(10)).to(device)

    def serve(cache):
        outs = [serving.lightning_attn_prefill(q, k, v, cu, cache, slot_ids, g, 0.5, use_initial_state, backend=backend)]
        for dq, dk, dv, _, ids, *_ in decode_args:
            outs.append(serving.lightning_attn_decode(dq, dk, dv, cache, ids, g, 0.5, backend=backend))
        return tuple(outs)

    eager_cache, compiled_cache = initial_cache.clone(), initial_cache.clone()
    compiled, counter = compile_counted(serve, backend=compiler)
    expected = [*serve(eager_cache), eager_cache]
    got = [*compiled(compiled_cache), compiled_cache]
    assert not torch.equal(eager_cache, initial_cache)
    # Bit for bit under inductor too: the graph has no arithmetic of its own, only the opaque ops and the
    # write-back of the mutated cache.
    assert_identical(got, expected)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one graph, same results forward and backward.


def _call(fn_name, backend):
    """A function of (q, k, v, h0, cu_seqlens) calling the public op ``fn_name`` with every state option on."""
    if fn_name == "chunk":
        return lambda q, k, v, h0, cu: chunk_simple_gla(
            q, k, v, g_gamma=G_GAMMA.to(q.device), scale=0.7, initial_state=h0, output_final_state=True,
            cu_seqlens=cu, chunk_size=CHUNK, reverse=cu is not None, backend=backend,
        )
    if fn_name == "recurrent":
        return lambda q, k, v, h0, cu: fused_recurrent_simple_gla(
            q, k, v, g_gamma=G_GAMMA.to(q.device), initial_state=h0, output_final_state=True, cu_seqlens=cu,
            backend=backend,
        )
    # Per-token gates (a gate projection inside the graph) with state_v_first: dg flows back into q.
    if fn_name == "gated":
        return lambda q, k, v, h0, cu: chunk_simple_gla(
            q, k, v, F.logsigmoid(q.sum(-1)), G_GAMMA.to(q.device), initial_state=h0.transpose(-1, -2),
            output_final_state=True, state_v_first=True, cu_seqlens=cu, chunk_size=CHUNK, backend=backend,
        )
    # The decay schedule itself (decay.g_gamma) is traced into the graph here.
    if fn_name == "lightning":
        return lambda q, k, v, h0, cu: chunk_lightning_attn(
            q, k, v, 1, 4, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=CHUNK, backend=backend
        )
    return lambda q, k, v, h0, cu: fused_recurrent_lightning_attn(
        q, k, v, 2, 4, initial_state=h0, output_final_state=True, cu_seqlens=cu, schedule="minimax", backend=backend
    )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "fn_name, varlen",
    [
        pytest.param("chunk", False, id="chunk_simple_gla"),
        pytest.param("chunk", True, id="chunk_simple_gla-varlen-reverse"),
        pytest.param("recurrent", False, id="fused_recurrent_simple_gla"),
        pytest.param("gated", True, id="chunk_simple_gla-g-state_v_first-varlen"),
        pytest.param("lightning", True, id="chunk_lightning_attn-varlen"),
        pytest.param("recurrent_lightning", False, id="fused_recurrent_lightning_attn"),
    ],
)
def test_compile_fullgraph_matches_eager(fn_name, varlen, target, fresh_dynamo):
    device, backend = target
    skip_without_engine(backend)
    fn = _call(fn_name, backend)
    inputs = _inputs(device, varlen=varlen)
    compiled, counter = compile_counted(fn)
    assert_identical(run_with_grads(compiled, *inputs), run_with_grads(fn, *inputs))
    assert counter.frame_count == 1
    # The public function traces to exactly one call of the custom op: validation and dispatch leave nothing.
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _gated_block(q, k, v, h0, gate, backend):
    """Elementwise work around the op (MiniMax-style SiLU features, a sigmoid gate) so inductor has code of its
    own to generate and fuse around the opaque custom op."""
    o, final = chunk_simple_gla(
        F.silu(q), F.silu(k), v, g_gamma=G_GAMMA.to(q.device), initial_state=h0, output_final_state=True,
        chunk_size=CHUNK, backend=backend,
    )
    return o * torch.sigmoid(gate), final


def _gated_block_reference(q, k, v, h0, gate):
    o, final = recurrent_reference(F.silu(q), F.silu(k), v, G_GAMMA.to(q.device), None, h0, True)
    return o * torch.sigmoid(gate), final


@pytest.mark.parametrize("target", TARGETS)
def test_compile_inductor(target, fresh_dynamo):
    """Inductor (C++ on CPU, Triton on CUDA) may round the SiLU / sigmoid differently from eager by an ulp, so
    this one is judged against the float64 reference relative to eager float32, forward and backward."""
    device, backend = target
    skip_without_engine(backend)
    q, k, v, h0, _ = _inputs(device)
    gate = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_()
    inputs = (q, k, v, h0, gate)
    fn = functools.partial(_gated_block, backend=backend)
    compiled, counter = compile_counted(fn, backend="inductor")
    got, eager = run_with_grads(compiled, *inputs), run_with_grads(fn, *inputs)
    exact = run_with_grads(_gated_block_reference, *(x.detach().double().requires_grad_() for x in inputs))
    names = ("o", "final_state", "dq", "dk", "dv", "dh0", "dgate")
    for name, g, e, ref in zip(names, got, eager, exact):
        assert g.dtype == e.dtype
        assert_matches_baseline(g, ref, e, name=name)
    assert counter.frame_count == 1


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "fn_name, how",
    [
        pytest.param("chunk", "mark_dynamic", id="chunk-mark_dynamic"),
        pytest.param("recurrent", "dynamic=True", id="recurrent-dynamic"),
    ],
)
def test_compile_dynamic_sequence_length(fn_name, how, target, fresh_dynamo):
    """A second (and third) sequence length reuses the one graph: T is symbolic in the fake implementation. The
    lengths cross RECURRENT_MAX_T, where the recurrent op switches engines inside the op (no guard on T)."""
    device, backend = target
    skip_without_engine(backend)
    fn = _call(fn_name, backend)
    compiled, counter = compile_counted(fn, dynamic=True if how == "dynamic=True" else None)
    for T in (37, 50, 80):
        inputs = _inputs(device, T=T, seed=T)
        if how == "mark_dynamic":
            for x in inputs[:3]:
                torch._dynamo.mark_dynamic(x, 1)
        assert_identical(run_with_grads(compiled, *inputs), run_with_grads(fn, *inputs))
    assert counter.frame_count == 1


def test_compile_reports_bad_input_with_the_validation_message(fresh_dynamo):
    """Shape/dtype validation is traced (it runs on fake tensors at compile time). With fullgraph=False a bad
    input raises the same ValueError as eager; with fullgraph=True dynamo refuses to trace the raise and its
    error carries our message."""
    q, k, v, h0, _ = _inputs("cpu", initial_state=False)
    bad_g = torch.zeros(H + 1)

    def fn(q, k, v, g):
        return chunk_simple_gla(q, k, v, g_gamma=g, backend="torch")

    with pytest.raises(ValueError, match=r"g_gamma must have shape \[H=3\]"):
        torch.compile(fn, backend="aot_eager")(q, k, v, bad_g)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=r"g_gamma must have shape \[H=3\]"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, bad_g)
    counters.clear()  # the deliberate failures above are recorded as graph breaks


def test_value_checks_are_eager_only():
    """The *values* of cu_seqlens / g_gamma are read only for real CPU tensors in eager mode (a read is a
    device sync on CUDA and a graph break under compile): eager CPU rejects them, tracing never reads them."""
    q, k, v, _, cu = _inputs("cpu", varlen=True, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, cu_seqlens=torch.tensor([0, 20, 5, 37]), backend="torch")
    with pytest.raises(ValueError, match="g_gamma must be finite and <= 0"):
        chunk_simple_gla(q, k, v, g_gamma=-G_GAMMA, backend="torch")
    # Reading a value while tracing would be a graph break, i.e. an error under fullgraph=True.
    torch._dynamo.reset()
    compiled, _ = compile_counted(_call("chunk", "torch"))
    compiled(q, k, v, None, cu)


# ---------------------------------------------------------------------------------------------------------------
# Autocast: the ops run in their inputs' precision and never touch the fp32 state's precision.


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fn_name", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_autocast_changes_nothing(dtype, fn_name, target):
    """Inside ``torch.autocast(bf16)`` the ops give bit-identical results to outside it: o in q's dtype (bf16
    inputs -> bf16 o; fp32 inputs stay fp32: no input is cast), final_state float32. Without the guard
    in ops.py autocast reached the engine's internal matmuls and rounded the state to bf16."""
    device, backend = target
    skip_without_engine(backend)
    fn = _call(fn_name, backend)
    inputs = _inputs(device, dtype=dtype)
    plain = run_with_grads(fn, *inputs)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = run_with_grads(fn, *inputs)
    assert_identical(mixed, plain)
    o, final = mixed[:2]
    assert o.dtype == dtype and final.dtype == torch.float32


@pytest.mark.parametrize("target", TARGETS)
def test_serving_ops_ignore_autocast(target):
    """Decode and prefill inside ``torch.autocast(bf16)``: the same outputs and cache updates as outside it."""
    device, backend = target
    skip_without_engine(backend)
    samples = [(serving.decode_op, args) for args in _decode_samples(device, backend)]
    samples += [(serving.prefill_op, args) for args in _prefill_samples(device, backend)]
    for op, args in samples:
        cache_index = 3 if op is serving.decode_op else 4
        results = []
        for enabled in (False, True):
            cache = args[cache_index].clone()
            call_args = (*args[:cache_index], cache, *args[cache_index + 1 :])
            with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
                results.append([op(*call_args), cache])
        assert_identical(results[1], results[0])


# ---------------------------------------------------------------------------------------------------------------
# A small block (projections + op) for activation checkpointing and a training loop.


class _Block(torch.nn.Module):
    """x [B, T, hidden] -> q, k, v projections -> chunked op from a learned h0 -> output projection."""

    def __init__(self, hidden: int = 24, backend: str = "torch", device="cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.qkv = torch.nn.Linear(hidden, H * (2 * K + V), bias=False, device=device)
        self.out = torch.nn.Linear(H * V, hidden, bias=False, device=device)
        self.h0 = torch.nn.Parameter(torch.randn(1, H, K, V, generator=gen).to(device) * 0.1)
        with torch.no_grad():
            for lin in (self.qkv, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5)
        self.backend = backend

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, H, -1).split([K, K, V], dim=-1)
        h0 = self.h0.expand(B, -1, -1, -1)
        o, _ = chunk_simple_gla(
            F.silu(q), F.silu(k), v, g_gamma=G_GAMMA.to(x.device), initial_state=h0, chunk_size=CHUNK,
            backend=self.backend,
        )
        return x + self.out(o.reshape(B, T, H * V))


def _block_input(device, T=37):
    return torch.randn(2, T, 24, generator=torch.Generator().manual_seed(7)).to(device).requires_grad_()


def param_grads(module, fn, x):
    """Output of fn(x), then the gradients of every parameter and of x (fixed random projection of the output)."""
    params = list(module.parameters())
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
    return [out.detach()] + list(torch.autograd.grad((out * w).sum(), params + [x]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("compiled", [pytest.param(False, id="eager"), pytest.param(True, id="compiled")])
def test_activation_checkpointing(compiled, target, fresh_dynamo):
    """``torch.utils.checkpoint`` (use_reentrant=False) recomputes the op's forward during backward; the
    recomputation is the same engine call, so the gradients are bit-identical to the stored-activation run. The
    compiled variant traces the checkpoint region as one higher-order op (fullgraph)."""
    device, backend = target
    skip_without_engine(backend)
    block = _Block(backend=backend, device=device)
    x = _block_input(device)

    def checkpointed(x):
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)

    if compiled:
        checkpointed, counter = compile_counted(checkpointed)
    assert_identical(param_grads(block, checkpointed, x), param_grads(block, block, x))
    if compiled:
        assert counter.frame_count == 1


def train_steps(module, step_fn, batches, autocast=False):
    """One AdamW step of ``mean(step_fn(x)^2)`` per batch (bf16 autocast if asked); returns the losses and the
    final parameters."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for x in batches:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step_fn(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses + [p.detach().clone() for p in module.parameters()]


def random_batches(device, lengths, hidden, seed=9):
    """``[2, T, hidden]`` float32 batches, one per sequence length."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, T, hidden, generator=gen).to(device) for T in lengths]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("autocast", [pytest.param(False, id="fp32"), pytest.param(True, id="autocast-bf16")])
def test_training_loop_compiled_matches_eager(autocast, target, fresh_dynamo):
    """Three AdamW steps at three sequence lengths (dynamic T after the first recompile at most): eager and
    compiled runs from the same initial weights give identical losses and weights (the learned h0 included)."""
    device, backend = target
    skip_without_engine(backend)
    eager_block = _Block(backend=backend, device=device)
    compiled_block = _Block(backend=backend, device=device)
    compiled_forward, counter = compile_counted(compiled_block)
    batches = random_batches(device, (37, 45, 53), hidden=24)
    expected = train_steps(eager_block, eager_block, batches, autocast=autocast)
    got = train_steps(compiled_block, compiled_forward, batches, autocast=autocast)
    assert_identical(got, expected)
    assert counter.frame_count <= 2  # static first T, then one dynamic-T graph for the rest

