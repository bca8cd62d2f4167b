"""``LightningAttention(..., context_parallel_group=group)``: each rank's slice of the token axis through the layer
equals that slice of the single-device layer on the whole axis (outputs, input gradients, parameter gradients
summed over the ranks), for padded-free rows and packed documents across shards, from a state or from zero."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from lightning_attention.nn import LightningAttention
from lightning_attention.testing import assert_matches_baseline
from tests.distributed.world import rank_job

HIDDEN, HEADS = 16, 2

# id -> (tokens per rank (world 4; world 2 takes the first two), batch rows, packed document lengths or None,
# initial state)
LAYOUTS = {
    "rows": ((9, 14, 0, 11), 2, None, False),
    "packed": ((12, 7, 15, 10), 1, (3, 0, 25, 1, 9), False),
    "packed-from-state": ((12, 7, 15, 10), 1, (20, 1, 4), True),
}


def _make_layer(dtype, group):
    torch.manual_seed(0)
    layer = LightningAttention(HIDDEN, HEADS, layer_idx=1, num_layers=3, chunk_size=16, backend="torch")
    layer = layer.to(dtype)
    layer.context_parallel_group = group
    return layer


def _run(layer, x, cu, h0, weights, final_weights):
    """Output, final state and the gradients of a weighted loss: inputs, state, parameters."""
    x = x.detach().clone().requires_grad_(True)
    h0 = None if h0 is None else h0.detach().clone().requires_grad_(True)
    out, final = layer.forward_with_state(x, initial_state=h0, cu_seqlens=cu, output_final_state=True)
    loss = (out.double() * weights).sum() + (final.double() * final_weights).sum()
    leaves = [x] + ([h0] if h0 is not None else []) + list(layer.parameters())
    grads = torch.autograd.grad(loss, leaves)
    names = ["x"] + (["h0"] if h0 is not None else []) + [n for n, _ in layer.named_parameters()]
    return {"out": out.detach(), "final": final.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}


def _case(layout, ctx) -> list[str]:
    shards, B, docs, from_state = LAYOUTS[layout]
    shards = shards[: ctx.world_size]
    bounds = [sum(shards[:r]) for r in range(ctx.world_size + 1)]
    T = bounds[-1]
    cu = None
    if docs is not None:
        cu_list = [0]
        for n in docs:
            cu_list.append(min(T, cu_list[-1] + n))
        cu = torch.tensor([*cu_list, T])
    N = B if cu is None else len(cu) - 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64)
    h0 = torch.randn(N, HEADS, HIDDEN // HEADS, HIDDEN // HEADS, generator=gen, dtype=torch.float64) if from_state else None
    weights = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64)
    final_weights = torch.randn(ctx.world_size, *(h0.shape if h0 is not None else (N, HEADS, 8, 8)), generator=gen,
                                dtype=torch.float64)  # fmt: skip

    def single(dtype):
        state = None if h0 is None else h0.to(torch.promote_types(dtype, torch.float32))
        return _run(_make_layer(dtype, None), x.to(dtype), cu, state, weights, final_weights.sum(0))

    exact, baseline = single(torch.float64), single(torch.float32)
    sl = slice(bounds[ctx.rank], bounds[ctx.rank + 1])
    state = None if h0 is None else h0.float()
    got = _run(_make_layer(torch.float32, dist.group.WORLD), x[:, sl].float(), cu, state, weights[:, sl],
               final_weights[ctx.rank])  # fmt: skip
    for name, value in got.items():
        if name in ("out", "dx"):
            exact_part, baseline_part = exact[name][:, sl], baseline[name][:, sl]
        else:  # replicated: the state, and the parameters' and h0's gradients summed over the ranks
            value = value.clone()
            if name.startswith("d"):
                dist.all_reduce(value)
            exact_part, baseline_part = exact[name], baseline[name]
        assert_matches_baseline(value, exact_part, baseline_part, name=f"{layout} rank {ctx.rank} {name}")
    return sorted(got)


@rank_job()
def layer_job(ctx) -> dict:
    results = {}
    for layout in LAYOUTS:
        try:
            results[layout] = _case(layout, ctx)
        except AssertionError as exc:
            results[layout] = f"FAILED: {exc}"
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_slice_matches_the_single_device_layer(world, layout):
    world_size, results = world
    key = f"{layer_job.__module__}.{layer_job.__name__}"
    for r in range(world_size):
        outcome = results[r][key]
        assert isinstance(outcome, dict), f"rank {r}: {outcome}"
        assert isinstance(outcome[layout], list), f"rank {r}: {outcome[layout]}"
        assert {"out", "final", "dx", "dqkv_proj.weight", "dout_proj.weight"} <= set(outcome[layout])


# ---------------------------------------------------------------------------------------------------------
# In process (a world of one).
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_option_is_an_attribute_shared_by_copies(world_of_one):
    layer = LightningAttention(HIDDEN, HEADS, context_parallel_group=world_of_one)
    assert layer.context_parallel_group is world_of_one
    twin = copy.deepcopy(layer)  # a process group cannot be copied: the copy shares it
    assert twin.context_parallel_group is world_of_one
    twin.context_parallel_group = None
    assert layer.context_parallel_group is world_of_one and twin.context_parallel_group is None
    x = torch.randn(1, 20, HIDDEN)
    cu = torch.tensor([0, 7, 20])
    torch.testing.assert_close(layer(x, cu_seqlens=cu), twin(x, cu_seqlens=cu))


def test_attention_mask_is_rejected_with_context_parallelism(world_of_one):
    layer = LightningAttention(HIDDEN, HEADS, context_parallel_group=world_of_one)
    x = torch.randn(2, 10, HIDDEN)
    with pytest.raises(ValueError, match="attention_mask is not supported with context_parallel_group"):
        layer(x, attention_mask=torch.ones(2, 10))
