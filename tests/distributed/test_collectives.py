"""Ranks that disagree, ranks with bad arguments, ranks that die or stall: every rank fails with one clear error,
within the process group's timeout, instead of hanging (gloo, 2 and 4 processes).

Disagreements run as jobs in the shared worlds (tests/distributed/world.py): the last rank deviates in one field,
every rank must raise the same error naming that field, and the group must still work afterwards. Dying and
stalling ranks break their world, so each of those runs in its own, with a short process-group timeout and a
hard deadline on the processes.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.distributed import context_parallel_lightning_attn, context_parallel_simple_gla
from lightning_attention.testing import assert_matches_baseline, make_inputs
from tests.distributed.world import rank_job, run_world

H, K, T = 2, 4, 8  # per rank: tokens [8 r, 8 r + 8)


def _args(*, heads=H, k_dim=K, v_dim=K, batch=1, dtype=torch.float32, **options):
    """Keyword arguments of one context_parallel_simple_gla call (a rank's shard); ``options`` as given."""
    q, k, v, _ = make_inputs(batch, T, heads, k_dim, v_dim, dtype=dtype, seed=1)
    return dict(q=q, k=k, v=v, g_gamma=decay.g_gamma(heads, 0, 2), **options)


def _h0():
    return make_inputs(1, 1, H, K, initial_state=True)[3]


def _gates(dtype=torch.float32):
    return torch.nn.functional.logsigmoid(torch.randn(1, T, H, generator=torch.Generator().manual_seed(2))).to(dtype)


# name -> (arguments of the rank that deviates, of the others, what the error must say: the field, and the deviant
# rank's value where one is shown). Built per world size: cu_seqlens covers all ranks' tokens.
def _disagreements(P: int) -> dict:
    total = T * P
    cu = torch.tensor([0, 5, total])
    shape = "q's B, H, K and v's V ([B, H, K, V])"
    bad_k = {**_args(), "k": _args()["k"][:, :3]}
    bad_cu = torch.tensor([0, 5, total + 1])
    return {
        "heads": (_args(heads=3), _args(), shape, "[1, 3, 4, 4]"),
        "k-dim": (_args(k_dim=8), _args(), shape, "[1, 2, 8, 4]"),
        "v-dim": (_args(v_dim=6), _args(), shape, "[1, 2, 4, 6]"),
        "batch": (_args(batch=2), _args(), shape, "[2, 2, 4, 4]"),
        "dtype": (_args(dtype=torch.bfloat16), _args(), "the dtype of q, k, v", "bfloat16"),
        "scale": (_args(scale=0.25), _args(), "scale", "0.25"),
        "reverse": (_args(reverse=True), _args(), "reverse", "True"),
        "chunk-size": (_args(chunk_size=32), _args(), "chunk_size", "32"),
        "output-final-state": (_args(output_final_state=True), _args(), "output_final_state", "True"),
        "initial-state": (_args(), _args(initial_state=_h0()), "whether initial_state is given", "False"),
        "g-gamma": ({**_args(), "g_gamma": decay.g_gamma(H, 1, 2)}, _args(), "g_gamma's values", None),
        "g-presence": (_args(g=_gates()), _args(), "whether g (per-token gates) is given", "float32"),
        "g-dtype": (_args(g=_gates(torch.bfloat16)), _args(g=_gates()), "g (per-token gates)", "bfloat16"),
        "g-gamma-passed-as-g": (
            {**_args(), "g": decay.g_gamma(H, 0, 2)}, _args(), "a constant per-head log-decay [H] is g_gamma", None
        ),  # fmt: skip
        "cu-seqlens-values": (_args(cu_seqlens=torch.tensor([0, 6, total])), _args(cu_seqlens=cu), "cu_seqlens", None),
        "cu-seqlens-presence": (_args(), _args(cu_seqlens=cu), "cu_seqlens", "-1/0"),
        "needs-grad": ("no grad", _args(), "whether the inputs require grad", "False"),
        "bad-arguments-on-one-rank": (
            bad_k, _args(), "k must have q's shape [B, T, H, K]: q (1, 8, 2, 4) float32 on cpu, k (1, 3, 2, 4)", None
        ),  # fmt: skip
        "cu-seqlens-not-covering-all-shards": (
            _args(cu_seqlens=bad_cu), _args(cu_seqlens=bad_cu),
            f"cu_seqlens[-1] must equal T={total} (the packed tokens), got {total + 1} [context parallel: T is the "
            f"whole axis, the shard lengths {[T] * P} summed]", None,
        ),  # fmt: skip
        # The lightning convenience takes part in the exchange the same way (its g_gamma from layer_idx).
        "lightning-layer-idx": ("layer 1", "layer 0", "g_gamma's values", None),
    }


def _call(kwargs: dict, grad: bool = True):
    """One forward (and backward if ``grad``); returns ("ok", None) or (exception type name, message)."""
    leaves = [kwargs[name].requires_grad_(grad) for name in ("q", "k", "v")]
    try:
        o, _ = context_parallel_simple_gla(**kwargs)
        if grad:
            torch.autograd.grad(o.sum(), leaves)
    except Exception as exc:  # the error is the result
        return type(exc).__name__, str(exc)
    return "ok", None


@rank_job()
def disagreement_job(ctx) -> dict:
    """Each disagreement, then a valid call (the group still works): name -> (type, message) on this rank."""
    deviant = ctx.rank == ctx.world_size - 1
    results = {}
    for name, (odd, others, _, _) in _disagreements(ctx.world_size).items():
        if odd == "no grad":
            results[name] = _call(others, grad=not deviant)
        elif name == "lightning-layer-idx":
            q, k, v, _ = make_inputs(1, T, H, K, seed=1)
            try:
                context_parallel_lightning_attn(q, k, v, layer_idx=int(deviant), num_layers=2)
                results[name] = ("ok", None)
            except ValueError as exc:
                results[name] = ("ValueError", str(exc))
        else:
            results[name] = _call(odd if deviant else others)
    results["valid-call-after-errors"] = _valid_call(ctx)
    return results


def _valid_call(ctx) -> str:
    P, rank = ctx.world_size, ctx.rank
    q, k, v, _ = make_inputs(1, T * P, H, K, seed=3)
    g = decay.g_gamma(H, 0, 2)
    sl = slice(T * rank, T * (rank + 1))
    o, _ = context_parallel_simple_gla(q[:, sl], k[:, sl], v[:, sl], g_gamma=g, chunk_size=16)
    exact, _ = chunk_simple_gla(q.double(), k.double(), v.double(), g_gamma=g, chunk_size=16)
    baseline, _ = chunk_simple_gla(q, k, v, g_gamma=g, chunk_size=16)
    assert_matches_baseline(o, exact[:, sl], baseline[:, sl], name=f"rank {rank} o")
    return "ok"


@pytest.mark.parametrize("name", list(_disagreements(2)))
def test_disagreement_raises_the_same_error_everywhere(world, name):
    world_size, results = world
    key = f"{disagreement_job.__module__}.{disagreement_job.__name__}"
    outcomes = []
    for r in range(world_size):
        assert isinstance(results[r][key], dict), f"rank {r}: {results[r][key]}"
        outcomes.append(results[r][key][name])
    assert len(set(outcomes)) == 1, f"ranks differ: {outcomes}"
    kind, message = outcomes[0]
    assert kind in ("ValueError", "TypeError"), outcomes[0]
    _, _, says, deviant_value = _disagreements(world_size)[name]
    assert says in message, message
    if deviant_value is not None:
        assert f"rank {world_size - 1}: {deviant_value}" in message, message


def test_group_still_works_after_the_errors(world):
    world_size, results = world
    key = f"{disagreement_job.__module__}.{disagreement_job.__name__}"
    for r in range(world_size):
        assert results[r][key]["valid-call-after-errors"] == "ok", results[r][key]["valid-call-after-errors"]


# ---------------------------------------------------------------------------------------------------------
# Ranks that die or stall: a world each.
# ---------------------------------------------------------------------------------------------------------

PG_TIMEOUT_S = 4.0


def _faulty_step(ctx, fault: str):
    """The last rank dies before the forward or before the backward, or stalls (never calls); the others run a
    forward and backward and must fail. Returns (exception type, message, seconds) on the survivors."""
    # Start together: a rank still importing (on a loaded machine, seconds) must not count against the others'
    # short timeout, or the survivors would fail at the first collective whatever the fault.
    ctx.start_together(fault)
    victim = ctx.rank == ctx.world_size - 1
    if victim and fault == "dies-before-forward":
        os._exit(0)
    if victim and fault == "stalls":
        time.sleep(PG_TIMEOUT_S + 2)  # past the others' timeout; then leave without calling
        os._exit(0)
    q, k, v, _ = make_inputs(1, T, H, K, seed=ctx.rank, requires_grad=True)
    start = time.monotonic()
    try:
        o, _ = context_parallel_simple_gla(q, k, v, g_gamma=decay.g_gamma(H, 0, 2))
        if victim:
            os._exit(0)
        o.sum().backward()
    except Exception as exc:  # the error is the result
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "no error", None, time.monotonic() - start


def dies_before_forward_job(ctx):
    return _faulty_step(ctx, "dies-before-forward")


def dies_before_backward_job(ctx):
    return _faulty_step(ctx, "dies-before-backward")


def stalls_job(ctx):
    return _faulty_step(ctx, "stalls")


FAULTS = {
    "dies-before-forward": (dies_before_forward_job, "exchange of the call signature failed"),
    "dies-before-backward": (dies_before_backward_job, "backward state-gradient all-gather failed"),
    "stalls": (stalls_job, "exchange of the call signature failed"),
}


@pytest.mark.parametrize(
    "fault, world_size",
    [pytest.param(f, n, id=f"{f}-world{n}") for f in FAULTS for n in (2, 4) if (f, n) != ("stalls", 4)],
)
def test_failed_rank_makes_the_others_fail_within_the_timeout(fault, world_size):
    job, step = FAULTS[fault]
    results, problems = run_world(
        world_size, [(fault, job.__module__, job.__name__)], deadline_s=60, pg_timeout_s=PG_TIMEOUT_S, teardown=False
    )
    assert not problems, problems
    for r in range(world_size - 1):
        assert fault in results[r], f"rank {r} wrote nothing"
        kind, message, seconds = results[r][fault]
        assert kind == "RuntimeError", (kind, message)
        assert f"context parallel attention: the {step}" in message, message
        assert "exited, or did not reach the same call within the process group's timeout" in message, message
        assert seconds < PG_TIMEOUT_S + 3, f"rank {r} took {seconds:.1f}s to fail"
