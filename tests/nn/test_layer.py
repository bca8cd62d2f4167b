"""LightningAttention layer: the formula (float64 reference), chunked prefill vs cached decode, padding that never
reaches the state, packed varlen batches, gradients, dtypes, transformers-compatible parameters, bad input."""

import importlib.util

import pytest
import torch

from lightning_attention import decay
from lightning_attention.nn import LightningAttention, LightningCache
from lightning_attention.testing import assert_matches_baseline, assert_rel_close, rel_err
from tests.nn.reference_layer import float64_params, reference_layer

HIDDEN, HEADS, HEAD_DIM, CHUNK = 32, 4, 8, 16
# float64 paths differ from the float64 reference only by summation order: ~1e-15; 1e-10 leaves room for T ~ 50
# while any error of the formula (a decay power, a lost state, a leaked pad) is O(1e-2) or more.
EXACT = 1e-10


def make_layer(dtype=torch.float64, schedule="minimax", layer_idx=1, backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    layer = LightningAttention(
        HIDDEN, HEADS, HEAD_DIM, layer_idx, 4, schedule=schedule, chunk_size=CHUNK, backend=backend, **kw
    )
    # Non-trivial norm weights, so that a wrong norm axis or a missing weight shows.
    torch.nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
    return layer.to(dtype)


def hidden(B, T, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)


def random_state(N, seed=2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, HEADS, HEAD_DIM, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("schedule", [pytest.param("minimax", id="minimax"), pytest.param("tnl", id="tnl")])
@pytest.mark.parametrize("T", [pytest.param(1, id="T1"), pytest.param(45, id="T45-odd-multi-chunk")])
@pytest.mark.parametrize("with_state", [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")])
def test_forward_matches_float64_formula(schedule, T, with_state):
    layer = make_layer(schedule=schedule)
    x = hidden(2, T)
    h0 = random_state(2) if with_state else None
    out, final = layer.forward_with_state(x, h0, output_final_state=True)
    ref, ref_final = reference_layer(layer, x, initial_state=h0)
    assert_rel_close(out, ref, EXACT, "output")
    assert_rel_close(final, ref_final, EXACT, "final_state")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_low_precision_matches_same_dtype_baseline(dtype):
    """Judged against float64 relative to the formula run in the same dtype (the project's tolerance policy)."""
    layer64 = make_layer()
    layer = make_layer(dtype)
    x = hidden(2, 45, dtype)
    ref = reference_layer(layer64, x)[0]
    baseline = _same_dtype_formula(layer, x)
    assert_matches_baseline(layer(x), ref, baseline, "output", factor=2.0)


def _same_dtype_formula(layer, x):
    """The formula with every intermediate rounded to x's dtype (state math in float32, as the ops do)."""
    from lightning_attention.reference import recurrent_reference

    B, T, _ = x.shape
    qkv = torch.nn.functional.silu(x @ layer.qkv_proj.weight.T).view(B, T, HEADS, 3 * HEAD_DIM)
    q, k, v = qkv.split(HEAD_DIM, dim=-1)
    o = recurrent_reference(q.float(), k.float(), v.float(), layer.g_gamma(), layer.scale)[0].to(x.dtype)
    return layer.out_proj(torch.sigmoid(layer.output_gate(x)) * layer.norm(o.reshape(B, T, -1)))


def test_decay_is_exact_after_dtype_cast():
    layer = make_layer(torch.bfloat16, layer_idx=2)
    expected = decay.g_gamma(HEADS, 2, 4, schedule="minimax")
    assert torch.equal(layer.g_gamma(), expected), "model.to(bfloat16) must not round the decay"
    assert layer.g_gamma().dtype == torch.float32


def test_decay_is_computed_on_the_host_and_marked_checked():
    """The decay the layer hands to the ops is the recipe's (computed on the host, whatever the default device) and
    marked as checked, so no op reads it back (a device sync on CUDA)."""
    from lightning_attention._validation import _g_gamma_needs_check

    layer = make_layer(layer_idx=3)
    with torch.device("meta"):
        g = layer.g_gamma("cpu")
    assert g.device.type == "cpu" and torch.equal(g, decay.g_gamma(HEADS, 3, 4, schedule="minimax"))
    assert not _g_gamma_needs_check(g)
    assert layer.g_gamma("cpu") is g, "cached per device"
    layer.layer_idx = 2
    expected = decay.g_gamma(HEADS, 2, 4, schedule="minimax")
    assert torch.equal(layer.g_gamma("cpu"), expected), "the cache follows the recipe"


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_built_on_meta_device_then_materialised(dtype):
    """Built under torch.device("meta") (from_pretrained's and FSDP2's construction), then to_empty() and
    reset_parameters(): the same weights as a layer built directly from the same seed, and the same outputs
    (the decay is computed from the recipe on use: nothing of it is left on the meta device)."""
    options = dict(chunk_size=CHUNK, backend="torch", dtype=dtype)
    with torch.device("meta"):
        meta = LightningAttention(HIDDEN, HEADS, HEAD_DIM, 1, 4, **options)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    torch.manual_seed(0)
    direct = LightningAttention(HIDDEN, HEADS, HEAD_DIM, 1, 4, **options)
    for (name, p), (_, q) in zip(meta.named_parameters(), direct.named_parameters()):
        assert torch.equal(p, q), name
    x = hidden(2, 21, dtype)
    assert torch.equal(meta(x), direct(x))
    assert torch.equal(meta.g_gamma(), decay.g_gamma(HEADS, 1, 4, schedule="minimax"))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("prompt", [pytest.param(1, id="prompt1"), pytest.param(19, id="prompt19")])
def test_cached_decode_equals_full_forward(dtype, prompt):
    """Prefill (chunked op) then one token at a time from the cache (recurrent op) == one forward over all."""
    layer = make_layer(dtype)
    T = 40
    x = hidden(2, T, dtype)
    full = layer(x)
    cache = LightningCache()
    steps = [layer(x[:, :prompt], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(prompt, T)]
    decoded = torch.cat(steps, dim=1)
    ref, ref_final = reference_layer(layer, x)
    if dtype == torch.float64:
        assert_rel_close(decoded, ref, EXACT, "decoded")
    else:
        assert_matches_baseline(decoded, ref, full, "decoded", factor=4.0)
    assert cache.get(layer.layer_idx).shape == (2, HEADS, HEAD_DIM, HEAD_DIM)
    assert cache.get(layer.layer_idx).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(cache.get(layer.layer_idx), ref_final, EXACT if dtype == torch.float64 else 1e-5, "cached state")


def _padded_batch(lengths, T, where, seed=3):
    """hidden [B, T, hidden] whose padded positions hold huge garbage, the mask, and each row's real positions."""
    x = hidden(len(lengths), T, seed=seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        if where == "left":
            pos = torch.arange(T - n, T)
        elif where == "right":
            pos = torch.arange(n)
        else:  # holes: every other pad position inside the row
            pos = torch.cat([torch.arange(0, T, 2), torch.arange(1, 2 * (n - (T + 1) // 2), 2)]).sort().values
        mask[b, pos] = 1
        rows.append(pos)
    x = torch.where(mask[..., None].bool(), x, 1e3 * torch.randn_like(x))
    return x, mask, rows


@pytest.mark.parametrize(
    "where",
    [pytest.param("left", id="left-pad"), pytest.param("right", id="right-pad"), pytest.param("holes", id="holes")],
)
@pytest.mark.parametrize("with_cache", [pytest.param(False, id="prefill"), pytest.param(True, id="continue-cache")])
def test_padding_never_reaches_the_state(where, with_cache):
    layer = make_layer()
    T, lengths = 37, [37, 30, 21]
    x, mask, rows = _padded_batch(lengths, T, where)
    h0 = random_state(len(lengths)) if with_cache else None
    out, final = layer.forward_with_state(x, h0, attention_mask=mask, output_final_state=True)
    for b, pos in enumerate(rows):
        ref, ref_final = reference_layer(layer, x[b : b + 1, pos], initial_state=None if h0 is None else h0[b : b + 1])
        assert_rel_close(out[b, pos], ref[0], EXACT, f"row {b} real tokens")
        assert_rel_close(final[b], ref_final[0], EXACT, f"row {b} final state")
        pads = torch.ones(T, dtype=torch.bool)
        pads[pos] = False
        assert torch.count_nonzero(out[b, pads]) == 0, "padded positions must output zero"


@pytest.mark.parametrize("with_state", [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")])
def test_all_padding_row_leaves_the_state_unchanged(with_state):
    layer = make_layer()
    x = hidden(2, 9)
    mask = torch.ones(2, 9)
    mask[1] = 0
    h0 = random_state(2) if with_state else None
    out, final = layer.forward_with_state(x, h0, attention_mask=mask, output_final_state=True)
    ref, ref_final = reference_layer(layer, x[:1], initial_state=None if h0 is None else h0[:1])
    assert_rel_close(out[0], ref[0], EXACT, "real row")
    assert torch.count_nonzero(out[1]) == 0
    assert torch.equal(final[1], torch.zeros_like(final[1]) if h0 is None else h0[1])


def test_padding_through_cache_object_and_bool_mask():
    layer = make_layer()
    x, mask, rows = _padded_batch([12, 5], 12, "left")
    cache = LightningCache()
    layer(x, attention_mask=mask.bool(), cache=cache)
    step = hidden(2, 1, seed=9)
    out = layer(step, cache=cache)
    for b, pos in enumerate(rows):
        ref = reference_layer(layer, torch.cat([x[b : b + 1, pos], step[b : b + 1]], dim=1))[0]
        assert_rel_close(out[b, 0], ref[0, -1], EXACT, f"row {b} first decoded token")


def test_all_ones_mask_equals_no_mask():
    layer = make_layer()
    x = hidden(2, 20)
    assert torch.equal(layer(x, attention_mask=torch.ones(2, 20)), layer(x))


@pytest.mark.parametrize("with_state", [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")])
def test_packed_varlen_equals_separate_sequences(with_state):
    layer = make_layer()
    bounds = [0, 7, 7, 40, 53]  # includes an empty sequence
    cu = torch.tensor(bounds, dtype=torch.int32)
    x = hidden(1, bounds[-1])
    h0 = random_state(len(bounds) - 1) if with_state else None
    cache = LightningCache()
    if h0 is not None:
        cache.update(layer.layer_idx, h0)
    out = layer(x, cache=cache, cu_seqlens=cu)
    ref, ref_final = reference_layer(layer, x, initial_state=h0, cu_seqlens=cu)
    assert_rel_close(out, ref, EXACT, "packed output")
    assert_rel_close(cache.get(layer.layer_idx), ref_final, EXACT, "per-sequence states")


@pytest.mark.parametrize("padded", [pytest.param(False, id="dense"), pytest.param(True, id="left-padded")])
def test_gradients_match_float64_formula(padded):
    layer = make_layer()
    T = 29
    x = hidden(2, T).requires_grad_(True)
    mask = None
    if padded:
        mask = torch.ones(2, T)
        mask[1, :11] = 0
    h0 = random_state(2).requires_grad_(True)
    out, final = layer.forward_with_state(x, h0, attention_mask=mask, output_final_state=True)
    gen = torch.Generator().manual_seed(5)
    d_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    d_final = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    grads = torch.autograd.grad((out * d_out).sum() + (final * d_final).sum(), [x, h0, *layer.parameters()])

    params = float64_params(layer, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    h0_ref = h0.detach().clone().requires_grad_(True)
    if mask is None:
        ref, ref_final = reference_layer(layer, x_ref, params, h0_ref)
    else:
        # Padded row: the reference sees only its real tokens; the pads get no gradient.
        ref0, fin0 = reference_layer(layer, x_ref[:1], params, h0_ref[:1])
        ref1, fin1 = reference_layer(layer, x_ref[1:, 11:], params, h0_ref[1:])
        ref = torch.cat([ref0, torch.cat([torch.zeros_like(ref1[:, :11].expand(1, 11, -1)), ref1], dim=1)])
        ref_final = torch.cat([fin0, fin1])
    ref_grads = torch.autograd.grad(
        (ref * d_out).sum() + (ref_final * d_final).sum(), [x_ref, h0_ref, *params.values()]
    )
    names = ["x", "initial_state", *params]
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert_rel_close(g, g_ref, EXACT, f"d{name}")
    if padded:
        assert torch.count_nonzero(grads[0][1, :11]) == 0, "padded tokens must get no gradient"


def test_transformers_parameter_names_and_shapes():
    layer = LightningAttention(64, 4, 16)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "qkv_proj.weight": (3 * 64, 64),
        "output_gate.weight": (64, 64),
        "norm.weight": (64,),
        "out_proj.weight": (64, 64),
    }
    assert set(layer.state_dict()) == set(shapes), "no buffers in the checkpoint: the decay comes from the config"


def test_inputs_are_not_modified():
    layer = make_layer()
    x, mask, _ = _padded_batch([20, 9], 20, "left")
    h0 = random_state(2)
    copies = [t.clone() for t in (x, mask, h0)]
    layer.forward_with_state(x, h0, attention_mask=mask, output_final_state=True)
    for before, after in zip(copies, (x, mask, h0)):
        assert torch.equal(before, after)


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda l: l(torch.randn(2, 5, HIDDEN + 1)), ValueError, "hidden_size", id="hidden-size"),
        pytest.param(lambda l: l(torch.randn(5, HIDDEN)), ValueError, r"\[B, T, hidden_size", id="2d-input"),
        pytest.param(lambda l: l("x"), TypeError, "hidden_states", id="not-a-tensor"),
        pytest.param(lambda l: l(torch.randn(2, 5, HIDDEN), attention_mask=torch.ones(2, 4)), ValueError,
                     "attention_mask", id="mask-shape"),
        pytest.param(lambda l: l(torch.randn(2, 5, HIDDEN), attention_mask=[[1] * 5] * 2), TypeError,
                     "attention_mask", id="mask-type"),
        pytest.param(lambda l: l(torch.randn(1, 5, HIDDEN), attention_mask=torch.ones(1, 5),
                                 cu_seqlens=torch.tensor([0, 5])), ValueError, "not both", id="mask-and-cu"),
        pytest.param(lambda l: l(torch.randn(2, 5, HIDDEN), cu_seqlens=torch.tensor([0, 5])), ValueError,
                     "batch size must be 1", id="cu-with-batch"),
        pytest.param(lambda l: l(torch.randn(2, 5, HIDDEN), cache={}), TypeError, "LightningCache", id="cache-type"),
        pytest.param(lambda l: l.forward_with_state(torch.randn(2, 5, HIDDEN), torch.zeros(3, HEADS, 8, 8)),
                     ValueError, "initial_state", id="state-shape"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(make_layer(torch.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"hidden_size": 30, "num_heads": 4}, "divisible", id="indivisible"),
        pytest.param({"hidden_size": 32, "num_heads": 0}, "num_heads", id="zero-heads"),
        pytest.param({"hidden_size": 32, "num_heads": 4, "activation": "tanh"}, "activation", id="activation"),
        pytest.param({"hidden_size": 32, "num_heads": 4, "schedule": "linear"}, "schedule", id="schedule"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LightningAttention(**kwargs)


def _triton_engines():
    return importlib.util.find_spec("lightning_attention.engines.triton.chunk") is not None


@pytest.mark.skipif(not _triton_engines(), reason="Triton engines not present")
def test_triton_backend_matches_torch_backend(triton_device):
    """Same layer on the Triton kernels (CPU interpreter or CUDA), prefill then cached decode, float32."""
    layer = make_layer(torch.float32).to(triton_device)
    x = hidden(2, 21, torch.float32).to(triton_device)
    mask = torch.ones(2, 21, device=triton_device)
    mask[1, :6] = 0
    outs = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        cache = LightningCache()
        outs[backend] = torch.cat([layer(x[:, :17], attention_mask=mask[:, :17], cache=cache),
                                   *(layer(x[:, t : t + 1], cache=cache) for t in range(17, 21))], dim=1)
    layer64, x64 = make_layer(), x.cpu()
    ref = torch.cat([reference_layer(layer64, x64[:1])[0], torch.nn.functional.pad(
        reference_layer(layer64, x64[1:, 6:])[0], (0, 0, 6, 0))])
    assert rel_err(outs["triton"].cpu(), ref) <= 2 * rel_err(outs["torch"].cpu(), ref) + 1e-6
