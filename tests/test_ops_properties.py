"""Property-based tests of the public scan ops (ops.py): random shapes, dtypes, packings, states, decays and
options, each op checked against the float64 definition, forward and every gradient.

hypothesis draws B, T (0..300), H, K and V (16..80, any value, not only powers of two), the dtype, a packing of
sequences (``cu_seqlens``, with empty and length-1 sequences drawn often), an initial state, the final state with
or without its gradient (dht), reverse, the chunk size, and the decay: a recipe (decay.g_gamma, "tnl" or
"minimax", random layer and depth, the recipe's scale) or random ``g_gamma <= 0`` per head (0, -0.0, tiny, strongly
negative down to -1000 where every power of lam underflows). The chunked and the recurrent op both run on the
drawn case and are each compared with the float64 token loop (reference.recurrent_reference), o, final_state
and the gradients of q, k, v and h0. The torch engine takes every dtype (float64 too); the Triton engine (on a
GPU, or on CPU through the interpreter) fewer examples of smaller shapes, since the interpreter is ~100x slower.

Tolerance (lightning_attention.testing.assert_matches_baseline): ``err(op) <= 2 * err(baseline) + floor``,
errors relative to the float64 reference on the same (already rounded) inputs; the baseline is plain torch in the
inputs' dtype, computing as the engine under test does:
- torch engine: both forms of the definition (reference.py's token loop and naive chunked form) in float32 on the
  inputs, o and dq, dk, dv rounded to their dtype; the larger of their two errors. The engine accumulates in float32
  and rounds once where these do, so their error is the part no implementation of the op in that dtype avoids (pure
  16-bit arithmetic would be a far weaker yardstick). Two summation orders, because with few independent sums
  (T = 1: one dot product per head) one order's rounding error is a single random draw: in an ill-conditioned
  float32 case the token loop was 3.6x more accurate than the chunked form, which the op matched (EDGE_CASES).
- Triton engine: in addition, the same op on the torch engine with its compute dtype pinned to the inputs'
  (tests/engines/triton/test_chunk.py's baseline). The kernels feed their products operands rounded to the input
  dtype (the state for Q S, the masked scores, the decayed V), which a float32 baseline does not: in float16 the
  final state's error is then ~1e-4 against the float32 loop's ~3e-8, but within 0.4-1.1x plain float16 torch's
  (30 random cases, every result).
The factor 2 leaves room for a different summation order; the floors cover a baseline that is (nearly) exact:
- float32 on the torch engine: 1e-6 (~16 float32 ulps), the library default;
- float32 on Triton: 1e-5, as tests/engines/triton/test_chunk.py: on a GPU fp32 dots run as three TF32 products
  (relative error ~2^-21 per product, above float32's own);
- float64 (torch engine only): the baseline *is* the float64 reference (plain torch in float64), so its error is
  0 and the floor is the whole tolerance: 1e-12. Random rounding errors of sums of up to T * K = 24,000 terms grow
  like sqrt(24,000) * 2^-53 ~ 2e-14 (norm-wise), the worst case T * K * 2^-53 ~ 3e-12 is never approached by
  random data; anything computed in float32 along the way shows as >= 1e-8.

Profiles (tests/conftest.py): "ci" by default, "long" with ``--hypothesis-profile=long``;
``--hypothesis-show-statistics`` prints how many examples each test ran.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_attention import decay
from lightning_attention.engines import get_engine
from lightning_attention.engines.cpu import _common as torch_engine_common
from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla
from lightning_attention.reference import chunk_reference, recurrent_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs, rel_err

NAMES = ("o", "final_state", "dq", "dk", "dv", "dh0")
STATE_NAMES = ("final_state", "dh0")  # float32 (float64) in every input dtype: never rounded to it

#: Examples per test, as a share of the profile's max_examples (tests/conftest.py): the torch test's example costs
#: 0.1-0.2 s (float64 and float32 reference passes with autograd, then both ops), one under the Triton interpreter
#: 0.5-4 s (with the smaller shapes below).
TORCH_EXAMPLES = settings().max_examples
TRITON_EXAMPLES = max(1, settings().max_examples // 6)


@dataclasses.dataclass(frozen=True)
class ScanCase:
    """One drawn case; its repr is what hypothesis prints for a failing example."""

    batch: int
    seq_len: int
    heads: int
    head_k: int
    head_v: int
    dtype: torch.dtype
    lengths: tuple[int, ...] | None  # packed sequences (cu_seqlens, batch 1), or None for a dense batch
    g_gamma: tuple[float, ...]
    decay: str  # where g_gamma came from ("tnl layer 3/12", "random")
    scale: float | None
    initial_state: bool
    final_state: bool
    dht: bool
    reverse: bool
    chunk_size: int
    seed: int

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        if self.lengths is None:
            return None
        return torch.tensor([0, *self.lengths], dtype=torch.int64).cumsum(0)

    @property
    def num_states(self) -> int:
        return self.batch if self.lengths is None else len(self.lengths)


@st.composite
def packed_lengths(draw, max_len: int) -> tuple[int, ...]:
    """1 to 6 sequence lengths summing to at most max_len; 0 and 1 drawn as often as any other length."""
    lengths, budget = [], max_len
    for _ in range(draw(st.integers(1, 6))):
        n = min(draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, max_len))), budget)
        lengths.append(n)
        budget -= n
    return tuple(lengths)


#: Random log-decays: none (0 and -0.0), tiny, ordinary, and strong enough that lam^C (C >= 16) underflows in
#: float32 (g <= -6) or every power of lam does (g = -1000).
RANDOM_G = st.one_of(
    st.sampled_from([0.0, -0.0, -1000.0]),
    st.floats(-1e-3, 0.0),
    st.floats(-2.0, 0.0),
    st.floats(-1000.0, 0.0),
)


@st.composite
def decays(draw, heads: int, head_k: int) -> tuple[tuple[float, ...], str, float | None]:
    """(g_gamma, where it came from, scale): a recipe of decay.py with its scale, or random values with the
    default scale."""
    if draw(st.booleans()):
        schedule = draw(st.sampled_from(decay.SCHEDULES))
        num_layers = draw(st.integers(1, 64))
        layer_idx = draw(st.integers(0, num_layers - 1))
        g = decay.g_gamma(heads, layer_idx, num_layers, schedule=schedule)
        return tuple(g.tolist()), f"{schedule} layer {layer_idx}/{num_layers}", decay.default_scale(schedule, head_k)
    return tuple(draw(st.lists(RANDOM_G, min_size=heads, max_size=heads))), "random", None


@st.composite
def scan_cases(draw, *, max_len: int, max_batch: int, max_heads: int, dtypes: tuple[torch.dtype, ...]) -> ScanCase:
    heads = draw(st.integers(1, max_heads))
    head_k, head_v = draw(st.integers(16, 80)), draw(st.integers(16, 80))
    if draw(st.booleans()):
        lengths = draw(packed_lengths(max_len))
        batch, seq_len = 1, sum(lengths)
    else:
        lengths = None
        batch, seq_len = draw(st.integers(1, max_batch)), draw(st.integers(0, max_len))
    g_gamma, source, scale = draw(decays(heads, head_k))
    final_state = draw(st.booleans())
    return ScanCase(
        batch=batch,
        seq_len=seq_len,
        heads=heads,
        head_k=head_k,
        head_v=head_v,
        dtype=draw(st.sampled_from(dtypes)),
        lengths=lengths,
        g_gamma=g_gamma,
        decay=source,
        scale=scale,
        initial_state=draw(st.booleans()),
        final_state=final_state,
        dht=final_state and draw(st.booleans()),
        reverse=draw(st.booleans()),
        chunk_size=draw(st.sampled_from([16, 32, 64, 128])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _forward_backward(op, inputs, do, dht, reference=False, **kwargs):
    """``(o, final or None, dq, dk, dv, dh0 or None)`` of ``op``: the gradients of sum(o * do) + sum(final * dht)
    (without the second term when dht is None) with respect to q, k, v and h0 (when given). ``reference``: op is
    one of reference.py's."""
    q, k, v, h0 = (None if t is None else t.detach().clone().requires_grad_() for t in inputs)
    o, final = op(q=q, k=k, v=v, initial_state=h0, **kwargs)
    loss = (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (final.double() * dht.double()).sum()
    leaves = [t for t in (q, k, v, h0) if t is not None]
    # The reference's graph leaves out inputs that nothing depends on (no token: q, k, v; and everything when no
    # final state is asked for either): their gradients are zero. The ops' graphs always hold every input
    # (tests/test_ops.py: empty sequences), which the strict call below checks.
    if reference and not loss.requires_grad:
        grads = [torch.zeros_like(t) for t in leaves]
    else:
        grads = torch.autograd.grad(loss, leaves, allow_unused=reference, materialize_grads=reference)
    return (o, final, *grads[:3], grads[3] if h0 is not None else None)


def _inputs(case: ScanCase):
    """q, k, v, h0 (or None) in the case's dtype on the CPU, the upstream gradients do and dht (or None), exact in
    the dtypes that o and final_state have."""
    q, k, v, h0 = make_inputs(
        case.batch, case.seq_len, case.heads, case.head_k, case.head_v, dtype=case.dtype, seed=case.seed,
        initial_state=case.initial_state, num_seqs=case.num_states,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(*v.shape, generator=gen, dtype=torch.float64).to(case.dtype)
    state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    shape = (case.num_states, case.heads, case.head_k, case.head_v)
    dht = torch.randn(shape, generator=gen, dtype=torch.float64).to(state_dtype) if case.dht else None
    return (q, k, v, h0), do, dht


def _common_kwargs(case: ScanCase) -> dict:
    return dict(
        g_gamma=torch.tensor(case.g_gamma, dtype=torch.float32),
        scale=case.scale,
        output_final_state=case.final_state,
        reverse=case.reverse,
        cu_seqlens=case.cu_seqlens,
    )


OPS = {
    "chunk": lambda case: functools.partial(chunk_simple_gla, chunk_size=case.chunk_size),
    "recurrent": lambda case: fused_recurrent_simple_gla,
}


def _definition_in_float32(case: ScanCase, inputs, do, dht, kwargs, round_to) -> list[tuple]:
    """Both forms of the definition (reference.py: the token loop, and the naive chunked form at the case's chunk
    size) in float32 on the inputs, with o and dq, dk, dv rounded to the input dtype by ``round_to``."""
    as32 = [None if t is None else t.float() for t in inputs]
    forms = (recurrent_reference, functools.partial(chunk_reference, chunk_size=case.chunk_size))
    return [
        tuple(t if t is None or name in STATE_NAMES else round_to(t) for name, t in
              zip(NAMES, _forward_backward(form, as32, do, dht, True, **kwargs)))
        for form in forms
    ]  # fmt: skip


def _torch_engine_baselines(case: ScanCase, op_name: str, inputs, do, dht, kwargs) -> list[tuple]:
    """Both forms of the definition in float32, rounded to the input dtype as torch rounds."""
    return _definition_in_float32(case, inputs, do, dht, kwargs, lambda t: t.to(case.dtype))


def _triton_engine_baselines(case: ScanCase, op_name: str, inputs, do, dht, kwargs) -> list[tuple]:
    """The same op on the torch engine with its compute dtype pinned to the inputs' (tests/engines/triton/
    test_chunk.py: like the kernels, it multiplies operands in the input dtype), and both forms of the definition
    in float32."""
    with torch_engine_common.computing_in(case.dtype):
        same_dtype = _forward_backward(OPS[op_name](case), inputs, do, dht, backend="torch", **kwargs)
    return [same_dtype, *_definition_in_float32(case, inputs, do, dht, kwargs, lambda t: t.to(case.dtype))]


def _distinct_ops(backend: str, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[str]:
    """The ops to run: both, except where the recurrent op would repeat the chunked op's computation bit for bit:
    on the Triton engine, which maps every chunk size to its kernels' 64 (engines/triton/chunk.py) and routes
    sequences of more than RECURRENT_TRITON_MAX_T tokens (mean) of the recurrent op to the chunked engine."""
    recurrent = get_engine(backend, "recurrent")
    if backend == "triton" and recurrent.pick(q, cu_seqlens) is get_engine(backend, "chunk"):
        return ["chunk"]
    return list(OPS)


def _check(case: ScanCase, backend: str, device: str, baselines_of, floor: float) -> None:
    inputs, do, dht = _inputs(case)
    kwargs = _common_kwargs(case)
    as64 = [None if t is None else t.double() for t in inputs]
    truth = _forward_backward(recurrent_reference, as64, do, None if dht is None else dht.double(), True, **kwargs)
    on_device = [None if t is None else t.to(device) for t in inputs]
    device_kwargs = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    for op_name in _distinct_ops(backend, on_device[0], device_kwargs["cu_seqlens"]):
        make_op = OPS[op_name]
        # plain torch in float64 is the float64 reference itself: the floor is the whole tolerance
        baselines = [truth] if case.dtype == torch.float64 else baselines_of(case, op_name, inputs, do, dht, kwargs)
        got = _forward_backward(make_op(case), on_device, do.to(device), None if dht is None else dht.to(device),
                                backend=backend, **device_kwargs)  # fmt: skip
        for i, (name, a, want) in enumerate(zip(NAMES, got, truth)):
            label = f"{op_name} {name}"
            if want is None:
                assert a is None, label
                continue
            base = max((b[i] for b in baselines), key=lambda b: rel_err(b, want))
            assert a.dtype == (state_dtype if name in STATE_NAMES else case.dtype) and a.shape == want.shape, label
            assert_matches_baseline(a.cpu(), want, base.cpu(), name=label, floor=floor)


FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


#: Always run, whatever the profile draws: no token at all with a state to pass through; packed sequences of 0 and
#: 1 tokens only, reversed, in bf16; and the long profile's find of an ill-conditioned float32 case (one token: dq
#: and dk hang on do . v, 0.36 from terms of total magnitude 31.9): dq's error 4.1e-6 is the naive chunked form's in
#: float32 too, the token loop's 1.1e-6 (why both forms are baselines).
EDGE_CASES = [
    ScanCase(batch=2, seq_len=0, heads=2, head_k=17, head_v=16, dtype=torch.float32, lengths=None, g_gamma=(0.0, -3.0),
             decay="random", scale=None, initial_state=True, final_state=True, dht=True, reverse=False, chunk_size=16,
             seed=1),
    ScanCase(batch=1, seq_len=2, heads=2, head_k=16, head_v=33, dtype=torch.bfloat16, lengths=(0, 1, 0, 1),
             g_gamma=(-0.0, -1000.0), decay="random", scale=None, initial_state=True, final_state=True, dht=True,
             reverse=True, chunk_size=64, seed=2),
    ScanCase(batch=1, seq_len=1, heads=2, head_k=77, head_v=50, dtype=torch.float32, lengths=None, g_gamma=(0.0, 0.0),
             decay="random", scale=None, initial_state=False, final_state=False, dht=False, reverse=False,
             chunk_size=16, seed=632),
]  # fmt: skip


@settings(max_examples=TORCH_EXAMPLES)
@example(case=EDGE_CASES[0])
@example(case=EDGE_CASES[1])
@example(case=EDGE_CASES[2])
@given(case=scan_cases(max_len=300, max_batch=3, max_heads=4, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)))
def test_torch_engine_matches_reference(case):
    _check(case, "torch", "cpu", _torch_engine_baselines, FLOORS[case.dtype])


#: bfloat16 only on a GPU: the interpreter truncates float32 -> bfloat16 (tests/engines/triton/rounding.py), and the
#: kernels round the operands of their products too, so under the interpreter their bf16 errors are 2.2-2.7x plain
#: torch's (measured on 30 random cases; 0.8-1.5x with the interpreter's cast made round-to-nearest like a GPU's).
#: The 16-bit kernels are one code path for both dtypes (a constexpr dtype): float16 runs it here.
TRITON_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())


@settings(max_examples=TRITON_EXAMPLES)
@example(case=EDGE_CASES[0])
@example(case=dataclasses.replace(EDGE_CASES[1], dtype=torch.float16))
@example(case=EDGE_CASES[2])
@given(case=scan_cases(max_len=100, max_batch=2, max_heads=2, dtypes=TRITON_DTYPES))
def test_triton_engine_matches_reference(triton_device, case):
    _check(case, "triton", triton_device, _triton_engine_baselines, 1e-5)
