"""The LightningAttention layer under torch.compile, activation checkpointing, autocast and a training loop.

Same equality policy as tests/test_compile.py: aot_eager and checkpointing run the same kernels as eager, so
results are compared bit for bit; the inductor test (slow: ~20 s of C++ compilation on 2 cores) is judged
against float64 relative to eager float32.
"""

from __future__ import annotations

import pytest
import torch

from lightning_attention.nn import LightningAttention, LightningCache
from lightning_attention.testing import assert_matches_baseline
from tests.test_compile import (  # noqa: F401  (fresh_dynamo is a fixture)
    TARGETS,
    VARLEN,
    assert_identical,
    compile_counted,
    fresh_dynamo,
    param_grads,
    random_batches,
    skip_without_engine,
    train_steps,
)

HIDDEN, HEADS = 32, 4  # head_dim 8


def _layer(device, backend, **kwargs):
    torch.manual_seed(0)
    options = dict(layer_idx=1, num_layers=4, chunk_size=16, backend=backend, device=device)
    return LightningAttention(HIDDEN, HEADS, **{**options, **kwargs})


def _input(device, B=2, T=37, seed=0):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("varlen", [pytest.param(False, id="batch"), pytest.param(True, id="cu_seqlens")])
def test_layer_compile_fullgraph_matches_eager(varlen, target, fresh_dynamo):
    """Forward and backward (input and every parameter) of the compiled layer, one graph, bit-identical."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device, B=1 if varlen else 2)
    cu_seqlens = torch.tensor(VARLEN, device=device) if varlen else None

    def forward(x):
        return layer(x, cu_seqlens=cu_seqlens)

    compiled, counter = compile_counted(forward)
    assert_identical(param_grads(layer, compiled, x), param_grads(layer, forward, x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("target", TARGETS)
def test_layer_compile_dynamic_sequence_length(target, fresh_dynamo):
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    compiled, counter = compile_counted(layer)
    for T in (37, 50, 80):
        x = _input(device, T=T, seed=T)
        torch._dynamo.mark_dynamic(x, 1)
        assert_identical(param_grads(layer, compiled, x), param_grads(layer, layer, x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("target", TARGETS)
def test_layer_compiled_prefill_then_decode(target, fresh_dynamo):
    """Prefill (chunked op) then token-by-token decode (recurrent op from the cached state), compiled: same
    outputs and cached states as eager. Two graphs (prefill, decode step), reused for every decode step."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    compiled, counter = compile_counted(layer)
    prompt, steps = _input(device).detach(), _input(device, T=4, seed=1).detach()
    results = []
    for step_fn in (layer, compiled):
        cache = LightningCache()
        outs = [step_fn(prompt, cache=cache)]
        outs += [step_fn(steps[:, t : t + 1], cache=cache) for t in range(steps.shape[1])]
        results.append(outs + [cache.get(layer.layer_idx)])
    assert_identical(results[1], results[0])
    assert results[1][-1].dtype == torch.float32
    assert counter.frame_count == 2


def _mask(device, T=37):
    """Left padding (row 0), right padding and a hole (row 1): every pattern in one batch."""
    mask = torch.ones(2, T, dtype=torch.long, device=device)
    mask[0, :5] = 0
    mask[1, 12:15] = 0
    mask[1, 30:] = 0
    return mask


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("with_state", [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")])
def test_layer_attention_mask_compiles_fullgraph(with_state, target, fresh_dynamo):
    """A padded batch is one graph (the padding is handled in tensor operations, nothing is read on the host):
    forward and backward (input, parameters, initial state) bit-identical to eager, for left, right and inner
    padding, from zero or from a state; one graph reused for a second mask."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device)
    h0 = torch.randn(2, HEADS, 8, 8, generator=torch.Generator().manual_seed(3)).to(device) if with_state else None
    mask = _mask(device)

    def forward(x, mask):
        out, final = layer.forward_with_state(x, h0, attention_mask=mask, output_final_state=True)
        return out + final.sum() * 1e-3  # the final state takes part in the gradients too

    compiled, counter = compile_counted(forward)
    for m in (mask, mask.flip(1)):
        expected = param_grads(layer, lambda x: forward(x, m), x)
        assert_identical(param_grads(layer, lambda x: compiled(x, m), x), expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("target", TARGETS)
def test_layer_exports_with_attention_mask(target):
    """torch.export of the layer with a padding mask (strict=False, the default): the exported program gives the
    eager results for a mask it was not traced with."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device).detach()
    mask = _mask(device)
    program = torch.export.export(layer, (x,), {"attention_mask": torch.ones_like(mask)})
    with torch.no_grad():
        assert_identical([program.module()(x, attention_mask=mask)], [layer(x, attention_mask=mask)])


@pytest.mark.parametrize("target", TARGETS)
def test_layer_activation_checkpointing(target):
    """Checkpointed layer (use_reentrant=False): gradients of the input and every parameter bit-identical."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device)

    def checkpointed(x):
        return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)

    assert_identical(param_grads(layer, checkpointed, x), param_grads(layer, layer, x))


@pytest.mark.parametrize("target", TARGETS)
def test_layer_autocast_state_stays_fp32(target):
    """Under bf16 autocast the projections run in bf16 (the layer's output is bf16) while the state stays float32
    (that the op's arithmetic is unchanged by autocast is tests/test_compile.py::test_autocast_changes_nothing)."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device, B=1)
    h0 = torch.randn(1, HEADS, 8, 8, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, final_state = layer.forward_with_state(x, h0, output_final_state=True)
    assert out.dtype == torch.bfloat16 and final_state.dtype == torch.float32


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("autocast", [pytest.param(False, id="fp32"), pytest.param(True, id="autocast-bf16")])
def test_layer_training_loop_compiled_matches_eager(autocast, target, fresh_dynamo):
    """AdamW steps at three sequence lengths: compiled and eager layers from the same weights end with
    identical losses and weights."""
    device, backend = target
    skip_without_engine(backend)
    eager_layer, compiled_layer = _layer(device, backend), _layer(device, backend)
    compiled, counter = compile_counted(compiled_layer)
    batches = random_batches(device, (37, 45, 53), hidden=HIDDEN)
    expected = train_steps(eager_layer, eager_layer, batches, autocast=autocast)
    assert_identical(train_steps(compiled_layer, compiled, batches, autocast=autocast), expected)
    assert counter.frame_count <= 2  # static first T, then one dynamic-T graph


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_layer_compile_inductor(target, fresh_dynamo):
    """Inductor fuses the activation, RMSNorm and gate around the op; judged against float64 relative to eager
    float32 (the float64 run is the same layer in float64: its op is checked against the exact reference in
    tests/test_ops.py)."""
    device, backend = target
    skip_without_engine(backend)
    layer = _layer(device, backend)
    x = _input(device)
    compiled, counter = compile_counted(layer, backend="inductor")
    got, eager = param_grads(layer, compiled, x), param_grads(layer, layer, x)
    layer64 = _layer(device, "torch", dtype=torch.float64)
    layer64.load_state_dict(layer.state_dict())
    exact = param_grads(layer64, layer64, x.detach().double().requires_grad_())
    names = ["out"] + [name for name, _ in layer.named_parameters()] + ["dx"]
    for name, g, e, ref in zip(names, got, eager, exact):
        assert_matches_baseline(g, ref, e, name=name)
    assert counter.frame_count == 1
