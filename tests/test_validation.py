"""Every bad input is rejected before any kernel runs, with a ValueError/TypeError that names the argument."""

import pytest
import torch

from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla

B, T, H, K, V = 1, 8, 2, 4, 3

OPS = [
    pytest.param(chunk_simple_gla, id="chunk"),
    pytest.param(fused_recurrent_simple_gla, id="recurrent"),
]


def _args(**overrides):
    """Valid arguments, with some replaced."""
    args = dict(
        q=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K),
        v=torch.randn(B, T, H, V),
        g_gamma=torch.tensor([0.0, -1.0]),
    )
    args.update(overrides)
    return args


BAD_INPUTS = [
    # q, k, v: types, ranks, shapes, dtypes, devices
    pytest.param(dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor", id="q-not-tensor"),
    pytest.param(dict(q=torch.randn(T, H, K)), ValueError, "q must have 4 dims", id="q-rank3"),
    pytest.param(dict(k=torch.randn(B, T, H, K, 1)), ValueError, "k must have 4 dims", id="k-rank5"),
    pytest.param(dict(v=torch.randn(B, T, H)), ValueError, "v must have 4 dims", id="v-rank3"),
    pytest.param(dict(k=torch.randn(B, T, H, K + 1)), ValueError, "k must have q's shape", id="k-head-dim"),
    pytest.param(dict(k=torch.randn(B, T + 1, H, K)), ValueError, "k must have q's shape", id="k-length"),
    pytest.param(dict(v=torch.randn(B, T, H + 1, V)), ValueError, r"v must be \[B, T, H, V\]", id="v-heads"),
    pytest.param(dict(v=torch.randn(B + 1, T, H, V)), ValueError, r"v must be \[B, T, H, V\]", id="v-batch"),
    pytest.param(dict(q=torch.randn(B, T, H, 0), k=torch.randn(B, T, H, 0)), ValueError, "head dims", id="K0"),
    pytest.param(dict(v=torch.randn(B, T, H, 0)), ValueError, "head dims", id="V0"),
    pytest.param(dict(k=torch.randn(B, T, H, K, dtype=torch.float64)), TypeError, "share one dtype", id="k-dtype"),
    pytest.param(dict(v=torch.randn(B, T, H, V).bfloat16()), TypeError, "share one dtype", id="v-dtype"),
    pytest.param(dict(q=torch.ones(B, T, H, K, dtype=torch.int64)), TypeError, "q must be float16", id="q-int"),
    pytest.param(dict(v=torch.ones(B, T, H, V, dtype=torch.bool)), TypeError, "v must be float16", id="v-bool"),
    pytest.param(dict(k=torch.ones(B, T, H, K, dtype=torch.complex64)), TypeError, "k must be float16", id="k-complex"),
    pytest.param(dict(v=torch.randn(B, T, H, V, device="meta")), ValueError, "one device", id="v-device"),
    # g_gamma
    pytest.param(dict(g_gamma=[0.0, -1.0]), TypeError, "g_gamma must be a torch.Tensor", id="g_gamma-list"),
    pytest.param(dict(g_gamma=torch.tensor([0.0, -1.0, -2.0])), ValueError, r"g_gamma must have shape \[H=2\]",
                 id="g_gamma-len"),
    pytest.param(dict(g_gamma=torch.zeros(1, 2)), ValueError, r"g_gamma must have shape \[H=2\]", id="g_gamma-rank2"),
    pytest.param(dict(g_gamma=torch.tensor([0.0, 0.5])), ValueError, "g_gamma must be finite and <= 0",
                 id="g_gamma-positive"),
    pytest.param(dict(g_gamma=torch.tensor([0.0, float("nan")])), ValueError, "g_gamma must be finite", id="g_gamma-nan"),
    pytest.param(dict(g_gamma=torch.tensor([0.0, -float("inf")])), ValueError, "g_gamma must be finite",
                 id="g_gamma-inf"),
    pytest.param(dict(g_gamma=torch.tensor([0, -1])), TypeError, "g_gamma must be a floating", id="g_gamma-int"),
    # g: per-token gates [B, T, H]; a [H] tensor where g goes is an old positional g_gamma, never reinterpreted
    pytest.param(dict(g=torch.tensor([0.0, -1.0])), ValueError, r"g must be per-token log gates .*pass g_gamma=",
                 id="g-is-g_gamma"),
    pytest.param(dict(g=[[0.0]]), TypeError, "g must be a torch.Tensor", id="g-list"),
    pytest.param(dict(g=torch.zeros(B, T, H + 1)), ValueError, r"g must have shape \[B, T, H\] = \[1, 8, 2\]",
                 id="g-heads"),
    pytest.param(dict(g=torch.zeros(B, T + 1, H)), ValueError, r"g must have shape \[B, T, H\]", id="g-length"),
    pytest.param(dict(g=torch.zeros(B, T, H, 1)), ValueError, r"g must have shape \[B, T, H\]", id="g-rank4"),
    pytest.param(dict(g=torch.zeros(T, H)), ValueError, r"g must have shape \[B, T, H\]", id="g-rank2"),
    pytest.param(dict(g=torch.zeros(B, T, H, dtype=torch.int64)), TypeError, "g must be a floating", id="g-int"),
    pytest.param(dict(g=torch.zeros(B, T, H, device="meta")), ValueError, "g must be on q's device", id="g-device"),
    # cu_seqlens
    pytest.param(dict(cu_seqlens=[0, T]), TypeError, "cu_seqlens must be a torch.Tensor", id="cu-list"),
    pytest.param(
        dict(q=torch.randn(2, T, H, K), k=torch.randn(2, T, H, K), v=torch.randn(2, T, H, V), cu_seqlens=torch.tensor([0, T])),
        ValueError, "cu_seqlens the batch size must be 1", id="cu-batch2",
    ),
    pytest.param(dict(cu_seqlens=torch.tensor([0.0, T])), TypeError, "cu_seqlens must be int32 or int64", id="cu-float"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, T], dtype=torch.int16)), TypeError, "cu_seqlens must be int32", id="cu-int16"),
    pytest.param(dict(cu_seqlens=torch.tensor([0])), ValueError, r"cu_seqlens must be 1-D \[N \+ 1\]", id="cu-single"),
    pytest.param(dict(cu_seqlens=torch.tensor([[0, T]])), ValueError, r"cu_seqlens must be 1-D", id="cu-rank2"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 3, T])), ValueError, "cu_seqlens must be non-decreasing", id="cu-not-monotone"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, T + 1])), ValueError, r"cu_seqlens\[-1\] must equal T=8", id="cu-last-big"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, T - 1])), ValueError, r"cu_seqlens\[-1\] must equal T=8", id="cu-last-small"),
    pytest.param(dict(cu_seqlens=torch.tensor([1, 3, T])), ValueError, "cu_seqlens must start at 0", id="cu-start"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, T], device="meta")), ValueError, "cu_seqlens must be on q's device", id="cu-device"),
    # initial_state
    pytest.param(dict(initial_state=torch.zeros(B, H, V, K)), ValueError, r"initial_state must have shape \[N, H, K, V\]", id="h0-KV-swapped"),
    pytest.param(dict(initial_state=torch.zeros(B, H, K, V), state_v_first=True), ValueError,
                 r"initial_state must have shape \[N, H, V, K\] \(state_v_first=True\)", id="h0-state_v_first"),
    pytest.param(dict(initial_state=torch.zeros(H, K, V)), ValueError, "initial_state must have shape", id="h0-rank3"),
    pytest.param(
        dict(initial_state=torch.zeros(1, H, K, V), cu_seqlens=torch.tensor([0, 3, T])),
        ValueError, "N = number of sequences", id="h0-varlen-N",
    ),
    pytest.param(dict(initial_state=torch.zeros(B, H, K, V, dtype=torch.int32)), TypeError,
                 "initial_state must be a floating", id="h0-int"),
    pytest.param(dict(initial_state=torch.zeros(B, H, K, V, device="meta")), ValueError, "initial_state must be on q's device", id="h0-device"),
    pytest.param(dict(initial_state=[[0.0]]), TypeError, "initial_state must be a torch.Tensor", id="h0-list"),
    # cu_seqlens_cpu: a host copy of cu_seqlens
    pytest.param(dict(cu_seqlens_cpu=torch.tensor([0, T])), ValueError, "pass cu_seqlens too", id="cpu-offsets-alone"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, T]), cu_seqlens_cpu=[0, T]), TypeError,
                 "cu_seqlens_cpu must be a torch.Tensor", id="cpu-offsets-list"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, T]), cu_seqlens_cpu=torch.tensor([0.0, T])), TypeError,
                 "cu_seqlens_cpu must be int32 or int64", id="cpu-offsets-float"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, T]), cu_seqlens_cpu=torch.tensor([0, T])), ValueError,
                 "cu_seqlens_cpu must have cu_seqlens' shape", id="cpu-offsets-shape"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, T]), cu_seqlens_cpu=torch.tensor([0, T], device="meta")),
                 ValueError, "cu_seqlens_cpu must be a CPU tensor", id="cpu-offsets-device"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, T]), cu_seqlens_cpu=torch.tensor([0, 4, T])), ValueError,
                 "cu_seqlens_cpu must hold cu_seqlens' values", id="cpu-offsets-differ"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 3, T]), cu_seqlens_cpu=torch.tensor([0, 5, 3, T])), ValueError,
                 "cu_seqlens must be non-decreasing", id="cpu-offsets-bad-values"),
    # scale, backend
    pytest.param(dict(scale="0.5"), TypeError, "scale must be a float", id="scale-str"),
    pytest.param(dict(scale=True), TypeError, "scale must be a float", id="scale-bool"),
    pytest.param(dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'torch', 'triton'\)", id="backend-name"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_INPUTS)
@pytest.mark.parametrize("op", OPS)
def test_bad_input_is_rejected(op, overrides, error, match):
    with pytest.raises(error, match=match):
        op(**_args(**overrides))


@pytest.mark.parametrize("op", OPS)
def test_initial_state_in_any_floating_dtype_is_computed_in_the_state_dtype(op):
    """fla accepts fp16/bf16 initial states; every floating dtype is accepted and widened (or, for float64 states
    with float32 inputs, rounded) to the state dtype: float32, float64 for float64 inputs."""
    h0 = torch.randn(B, H, K, V)
    for inputs_dtype, h0_dtype, state_dtype in (
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float64, torch.float32, torch.float64),
    ):
        args = _args(**{name: t.to(inputs_dtype) for name, t in _args().items() if name in "qkv"})
        _, final = op(**args, initial_state=h0.to(h0_dtype), output_final_state=True)
        _, final_wide = op(**args, initial_state=h0.to(h0_dtype).to(state_dtype), output_final_state=True)
        assert final.dtype == state_dtype
        torch.testing.assert_close(final, final_wide, rtol=0, atol=0)


@pytest.mark.parametrize(
    "chunk_size, error",
    [
        pytest.param(48, ValueError, id="not-power-of-two"),
        pytest.param(8, ValueError, id="below-16"),
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-64, ValueError, id="negative"),
        pytest.param(64.0, TypeError, id="float"),
        pytest.param(True, TypeError, id="bool"),
    ],
)
def test_bad_chunk_size(chunk_size, error):
    with pytest.raises(error, match="chunk_size must be"):
        chunk_simple_gla(**_args(), chunk_size=chunk_size)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    """Without CUDA the Triton backend runs only under TRITON_INTERPRET=1 (or needs the package at all)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs (CUDA tensors|the triton package)"):
        chunk_simple_gla(**_args(), backend="triton")


@pytest.mark.parametrize(
    "op, keyword",
    [
        pytest.param(chunk_simple_gla, "head_first", id="chunk-head_first"),
        pytest.param(chunk_simple_gla, "transpose_state_layout", id="chunk-transpose_state_layout"),
        pytest.param(chunk_simple_gla, "gk", id="chunk-gk"),
        pytest.param(fused_recurrent_simple_gla, "chunk_size", id="recurrent-chunk_size"),
        pytest.param(fused_recurrent_simple_gla, "head_first", id="recurrent-head_first"),
    ],
)
def test_unknown_keyword_is_rejected(op, keyword):
    """fla's ops take ``**kwargs`` and ignore what they do not know; ours name it in a TypeError instead."""
    with pytest.raises(TypeError, match=keyword):
        op(**_args(), **{keyword: False})


# ---------------------------------------------------------------------------------------------------------------
# Values read on the device: cu_seqlens where an engine reads it on the host, g_gamma once per version.

BAD_CU_SEQLENS = [
    pytest.param([0, 5, 900], "must equal T=8", id="last-past-T"),
    pytest.param([0, 6, 3, 8], "non-decreasing", id="decreasing"),
    pytest.param([-2, 3, 8], "must start at 0", id="negative-start"),
]


def _as_if_on_the_device(monkeypatch):
    """Make every value check that ops.py does up front see an unreadable tensor, as for a CUDA tensor."""
    from lightning_attention import _validation

    monkeypatch.setattr(_validation, "values_readable", lambda t: False)


@pytest.mark.parametrize("bounds, match", BAD_CU_SEQLENS)
@pytest.mark.parametrize(
    "op, backend",
    [
        pytest.param(chunk_simple_gla, "torch", id="chunk-torch"),
        pytest.param(chunk_simple_gla, "triton", id="chunk-triton"),
        pytest.param(fused_recurrent_simple_gla, "torch", id="recurrent-torch"),
    ],
)
def test_cu_seqlens_is_checked_where_the_engine_reads_it(monkeypatch, request, op, backend, bounds, match):
    """Device-resident offsets are not checked up front (that would be a sync per call), but every engine that
    reads them on the host checks them there, before a kernel runs. On a GPU the tensors are CUDA tensors; on the
    CPU the up-front check is made to see them as unreadable, as it sees CUDA tensors."""
    if backend == "triton":
        device = request.getfixturevalue("triton_device")
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _as_if_on_the_device(monkeypatch)
    args = {name: t.to(device) for name, t in _args(cu_seqlens=torch.tensor(bounds)).items()}
    with pytest.raises(ValueError, match=match):
        op(**args, backend=backend)


@pytest.mark.parametrize("bounds, match", BAD_CU_SEQLENS)
def test_cu_seqlens_of_the_layer_and_prefill(monkeypatch, bounds, match):
    from lightning_attention.nn import LightningAttention
    from lightning_attention.serving import lightning_attn_prefill, new_state_cache

    _as_if_on_the_device(monkeypatch)
    cu = torch.tensor(bounds)
    with pytest.raises(ValueError, match=match):
        LightningAttention(8, 2)(torch.randn(1, T, 8), cu_seqlens=cu)
    q, k, v = (torch.randn(1, T, H, K) for _ in range(3))
    cache = new_state_cache(4, H, K)
    with pytest.raises(ValueError, match=match):
        lightning_attn_prefill(q, k, v, cu, cache, torch.arange(len(bounds) - 1), torch.tensor([0.0, -1.0]))
    assert not cache.any()


def test_g_gamma_values_are_read_once_per_version(monkeypatch):
    """A device-resident g_gamma costs one read per content, not per call: its values are checked on first use
    and again only after an in-place change; decay.g_gamma's results are known good and never read."""
    from lightning_attention import decay

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.data_ptr()) or real_tolist(t))
    g = torch.tensor([0.0, -1.0])
    args = _args(g_gamma=g)
    chunk_simple_gla(**args)
    chunk_simple_gla(**args)
    fused_recurrent_simple_gla(**args)
    assert reads.count(g.data_ptr()) == 1
    g.fill_(0.5)  # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match="g_gamma must be finite and <= 0"):
        chunk_simple_gla(**args)
    recipe = decay.g_gamma(H, 0, 2)
    chunk_simple_gla(**_args(g_gamma=recipe))
    assert recipe.data_ptr() not in reads


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bounds, match",
    [
        pytest.param([0, 40, 900], "must equal T=64", id="last-past-T"),
        pytest.param([0, 48, 24, 64], "non-decreasing", id="decreasing"),
        pytest.param([-16, 24, 64], "must start at 0", id="negative-start"),
    ],
)
def test_cuda_cu_seqlens_is_checked_before_the_kernels(bounds, match):
    """On CUDA the chunked and recurrent ops (above 16 tokens per sequence on average) read cu_seqlens on the host
    to plan their launches: it is checked there. The serving prefill never reads it on the host: its kernels check
    it, run no sequence into the cache, and report it (serving.check_errors)."""
    from lightning_attention.serving import check_errors, lightning_attn_prefill, new_state_cache

    cu = torch.tensor(bounds, device="cuda")
    q, k, v = (torch.randn(1, 64, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.tensor([0.0, -1.0], device="cuda")
    with pytest.raises(ValueError, match=match):
        chunk_simple_gla(q, k, v, g_gamma=g, cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        fused_recurrent_simple_gla(q, k, v, g_gamma=g, cu_seqlens=cu)
    cache = new_state_cache(4, H, 64, device="cuda")
    lightning_attn_prefill(q, k, v, cu, cache, torch.arange(len(bounds) - 1, device="cuda"), g)
    with pytest.raises(ValueError, match="cu_seqlens"):
        check_errors()
    assert not bool(cache.any())
