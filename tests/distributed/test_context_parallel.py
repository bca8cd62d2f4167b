"""Context parallelism on CPU with gloo: 1 (in process), 2 and 4 processes against the single-process op.

Each world size is spawned once (module fixture) and runs every case inside; every rank compares its shard
of the output and of the gradients (q, k, v, its share of dh0, and the group sum of dh0) with the exact
float64 reference, judged against the single-process op in the same dtype (lightning_attention.testing).
The loss is the sum of per-rank losses, each with its own weight on the replicated final state, so the
summation of final-state gradients across ranks is exercised too.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.distributed import context_parallel_lightning_attn, context_parallel_simple_gla
from lightning_attention.engines import triton_available
from lightning_attention.reference import chunk_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs


@dataclass(frozen=True)
class Case:
    id: str
    shards: tuple[int, ...]  # tokens per rank, first entries used for smaller groups
    dtype: torch.dtype = torch.float32
    B: int = 1
    H: int = 4
    K: int = 8
    V: int = 8
    schedule: str = "tnl"
    layer_idx: int = 0  # layer 0 of "tnl" has an undecayed head and g = -6 (lam^24 underflows in bf16 range)
    initial_state: bool = True
    final_state: bool = True
    reverse: bool = False
    api: str = "simple"  # or "lightning": the layer_idx/num_layers convenience
    odd_ranks_only: bool = False  # run on a subgroup (group rank != global rank)
    backend: str = "torch"  # "triton": the Triton engine (CUDA, or CPU under TRITON_INTERPRET=1, as in CI)
    world_sizes: tuple[int, ...] = (2, 4)


CASES = [
    Case("fp32-h0-final", (24, 24, 24, 24)),
    Case("fp32-uneven-KneV-B2", (5, 33, 1, 17), B=2, K=8, V=12),
    Case("fp32-empty-shard", (0, 20, 7, 0)),
    Case("fp32-reverse", (24, 13, 24, 30), reverse=True),
    Case("fp32-no-state", (24, 40, 8, 16), initial_state=False, final_state=False),
    Case("fp32-h0-only", (17, 24, 24, 9), final_state=False),
    Case("fp32-final-only", (24, 24, 24, 24), initial_state=False, reverse=True),
    Case("bf16-minimax", (40, 24, 32, 24), dtype=torch.bfloat16, schedule="minimax"),
    Case("fp64-deep-layer", (24, 19, 24, 24), dtype=torch.float64, layer_idx=3),
    Case("lightning-api", (24, 24, 24, 24), api="lightning", layer_idx=1),
    Case("subgroup", (24, 21, 24, 24), odd_ranks_only=True),
    # The interpreter is slow: two ranks only (the combine across more ranks is covered above).
    Case("triton-engine", (20, 9), K=16, V=16, H=2, reverse=True, backend="triton", world_sizes=(2,)),
]
NUM_LAYERS = 4
CHUNK = 16  # small, so shards span several chunks and end in partial ones
FLOOR = {torch.float64: 1e-12}


def _full_results(case: Case, q, k, v, h0, g, scale, w_o, w_f, bounds, exact: bool):
    """Single-process outputs and gradients: of the total loss, and dh0 of each rank's own loss.

    ``exact``: the float64 reference (inputs upcast); else the op itself in the inputs' dtype."""
    dtype = torch.float64 if exact else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    if h0 is not None:
        h0 = h0.detach().to(torch.float64 if exact else h0.dtype).requires_grad_(True)
    if exact:
        o, final = chunk_reference(*leaves, g, scale, h0, case.final_state, case.reverse, chunk_size=CHUNK)
    else:
        o, final = chunk_simple_gla(
            *leaves, g_gamma=g, scale=scale, initial_state=h0, output_final_state=case.final_state, chunk_size=CHUNK,
            reverse=case.reverse, backend=case.backend,
        )
    rank_losses = []
    for r, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        loss = (o[:, start:end].double() * w_o[:, start:end].double()).sum()
        if case.final_state:
            loss = loss + (final.double() * w_f[r].double()).sum()
        rank_losses.append(loss)
    inputs = leaves + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad(sum(rank_losses), inputs, retain_graph=True)
    out = {"o": o.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if final is not None:
        out["final"] = final.detach()
    if h0 is not None:
        out["dh0_sum"] = grads[3]
        out["dh0_share"] = [torch.autograd.grad(loss, h0, retain_graph=True)[0] for loss in rank_losses]
    return out


def _triton_runs_on_cpu() -> bool:
    return triton_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _run_case(case: Case, group, rank: int, world_size: int) -> list[str]:
    """Returns the names of the tensors checked on this rank; raises AssertionError on a mismatch."""
    shards = case.shards[:world_size]
    bounds = [sum(shards[:r]) for r in range(world_size + 1)]
    T = bounds[-1]
    q, k, v, h0 = make_inputs(case.B, T, case.H, case.K, case.V, case.dtype, seed=7, initial_state=case.initial_state)
    gen = torch.Generator().manual_seed(11)
    w_o = torch.randn(case.B, T, case.H, case.V, generator=gen, dtype=torch.float64)
    w_f = torch.randn(world_size, case.B, case.H, case.K, case.V, generator=gen, dtype=torch.float64)
    g = decay.g_gamma(case.H, case.layer_idx, NUM_LAYERS, schedule=case.schedule)
    scale = decay.default_scale(case.schedule, case.K)

    ref = _full_results(case, q, k, v, h0, g, scale, w_o, w_f, bounds, exact=True)
    base = _full_results(case, q, k, v, h0, g, scale, w_o, w_f, bounds, exact=False)

    sl = slice(bounds[rank], bounds[rank + 1])
    mine = [x[:, sl].detach().clone().requires_grad_(True) for x in (q, k, v)]
    my_h0 = h0.clone().requires_grad_(True) if h0 is not None else None
    if case.api == "lightning":
        o, final = context_parallel_lightning_attn(
            *mine, case.layer_idx, NUM_LAYERS, None, my_h0, case.final_state, group,
            chunk_size=CHUNK, schedule=case.schedule, reverse=case.reverse, backend=case.backend,
        )
    else:
        o, final = context_parallel_simple_gla(
            *mine, g, scale, my_h0, case.final_state, group, reverse=case.reverse, chunk_size=CHUNK,
            backend=case.backend,
        )
    assert (final is None) == (not case.final_state), "final_state returned iff asked for"
    loss = (o.double() * w_o[:, sl]).sum()
    if final is not None:
        loss = loss + (final.double() * w_f[rank]).sum()
    loss.backward()

    floor = FLOOR.get(case.dtype, 1e-6)
    checks = {"o": (o, ref["o"][:, sl], base["o"][:, sl])}
    for name, leaf in zip(("dq", "dk", "dv"), mine):
        checks[name] = (leaf.grad, ref[name][:, sl], base[name][:, sl])
    if final is not None:
        checks["final"] = (final, ref["final"], base["final"])
    if my_h0 is not None:
        checks["dh0_share"] = (my_h0.grad, ref["dh0_share"][rank], base["dh0_share"][rank])
        dh0_sum = my_h0.grad.clone()
        dist.all_reduce(dh0_sum, group=group)
        checks["dh0_sum"] = (dh0_sum, ref["dh0_sum"], base["dh0_sum"])
    for name, (got, exact, baseline) in checks.items():
        assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype}, expected {baseline.dtype}"
        assert_matches_baseline(got, exact, baseline, name=f"rank {rank} {name}", floor=floor)
    return sorted(checks)


def _run_chain(group, rank: int, world_size: int) -> list[str]:
    """Two calls in a row, the second starting from the first's final state (not detached): the summed
    final-state gradients and the per-rank dh0 shares must compose into the single-process chain's gradients."""
    T, shard = 16 * world_size, 16
    inputs = [make_inputs(1, T, 2, 8, seed=s, initial_state=True) for s in (3, 4)]
    (qa, ka, va, h0), (qb, kb, vb, _) = inputs
    gen = torch.Generator().manual_seed(5)
    w_a, w_b = (torch.randn(1, T, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    w_f = torch.randn(world_size, 1, 2, 8, 8, generator=gen, dtype=torch.float64)
    g = decay.g_gamma(2, 0, 2)
    leaves = {"qa": qa, "ka": ka, "va": va, "qb": qb, "kb": kb, "vb": vb, "h0": h0}

    def chain(run, tensors, sl, final_weight):
        first_o, first_final = run(tensors["qa"], tensors["ka"], tensors["va"], tensors["h0"])
        second_o, second_final = run(tensors["qb"], tensors["kb"], tensors["vb"], first_final)
        loss = (first_o.double() * w_a[:, sl]).sum() + (second_o.double() * w_b[:, sl]).sum()
        return loss + (second_final.double() * final_weight).sum()

    def single(dtype, run):
        tensors = {name: t.detach().to(dtype).requires_grad_(True) for name, t in leaves.items()}
        loss = chain(run, tensors, slice(None), w_f.sum(0))
        return dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values()))))

    ref = single(torch.float64, lambda q, k, v, s: chunk_reference(q, k, v, g, None, s, True, chunk_size=CHUNK))
    base = single(torch.float32, lambda q, k, v, s: chunk_simple_gla(
        q, k, v, g_gamma=g, initial_state=s, output_final_state=True, chunk_size=CHUNK))
    sl = slice(rank * shard, (rank + 1) * shard)
    mine = {n: (t[:, sl] if n != "h0" else t).detach().clone().requires_grad_(True) for n, t in leaves.items()}

    def cp_run(q, k, v, state):
        return context_parallel_simple_gla(q, k, v, g, None, state, True, group, chunk_size=CHUNK)

    chain(cp_run, mine, sl, w_f[rank]).backward()
    dist.all_reduce(mine["h0"].grad, group=group)
    for name, t in mine.items():
        exact, baseline = (ref[name], base[name]) if name == "h0" else (ref[name][:, sl], base[name][:, sl])
        assert_matches_baseline(t.grad, exact, baseline, name=f"rank {rank} chained d{name}")
    return sorted(mine)


def _worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    results = {}
    try:
        odd_group = dist.new_group([r for r in range(world_size) if r % 2 == 1])
        for case in CASES:
            if world_size not in case.world_sizes or (case.backend == "triton" and not _triton_runs_on_cpu()):
                continue
            group = odd_group if case.odd_ranks_only else None
            if case.odd_ranks_only and rank % 2 == 0:
                continue
            members = world_size // 2 if case.odd_ranks_only else world_size
            try:
                results[case.id] = _run_case(case, group, dist.get_rank(group), members)
            except AssertionError as exc:
                results[case.id] = f"FAILED: {exc}"
            except Exception:  # report, don't hang the other ranks' result collection
                results[case.id] = "ERROR: " + traceback.format_exc()
        try:
            results["chained"] = _run_chain(None, rank, world_size)
        except Exception:
            results["chained"] = "ERROR: " + traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Tear down only once every rank is done: a rank destroying its gloo pairs while a peer still sends
        # was seen to abort the process ("terminate called without an active exception") in one CI run.
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def spawned(request):
    """Runs every case on ``world_size`` processes once; returns ``(world_size, [results per rank])``."""
    world_size = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, str(Path(tmp) / "store"), tmp), nprocs=world_size, join=True)
        return world_size, [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_single_process(spawned, case):
    world_size, results = spawned
    if world_size not in case.world_sizes:
        pytest.skip(f"{case.id} runs on {case.world_sizes} processes")
    if case.backend == "triton" and not _triton_runs_on_cpu():
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the CP tests run on CPU tensors)")
    ranks = [r for r in range(world_size) if r % 2 == 1] if case.odd_ranks_only else range(world_size)
    expected = {"o", "dq", "dk", "dv"} | ({"final"} if case.final_state else set())
    expected |= {"dh0_share", "dh0_sum"} if case.initial_state else set()
    for r in ranks:
        outcome = results[r].get(case.id, "not run")
        assert not isinstance(outcome, str), f"rank {r}: {outcome}"
        assert set(outcome) == expected, f"rank {r} checked {outcome}"


def test_chained_calls_match_single_process(spawned):
    world_size, results = spawned
    for r in range(world_size):
        outcome = results[r].get("chained", "not run")
        assert not isinstance(outcome, str), f"rank {r}: {outcome}"
        assert outcome == ["h0", "ka", "kb", "qa", "qb", "va", "vb"], f"rank {r} checked {outcome}"


# ---------------------------------------------------------------------------------------------------------
# In process: world size 1 and validation.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("reverse", [pytest.param(False, id="forward"), pytest.param(True, id="reverse")])
def test_world_of_one_is_the_single_device_op(world_of_one, reverse):
    q, k, v, h0 = make_inputs(2, 45, 3, 8, 6, initial_state=True, requires_grad=True)
    g = decay.g_gamma(3, 0, 2)
    o, final = context_parallel_simple_gla(q, k, v, g, None, h0, True, reverse=reverse, chunk_size=CHUNK)
    exact = [x.double() for x in (q, k, v, h0)]
    o_ref, final_ref = chunk_reference(*exact[:3], g, None, exact[3], True, reverse, chunk_size=CHUNK)
    o_base, final_base = chunk_simple_gla(
        q, k, v, g_gamma=g, initial_state=h0, output_final_state=True, chunk_size=CHUNK, reverse=reverse
    )
    assert_matches_baseline(o, o_ref, o_base, name="o")
    assert_matches_baseline(final, final_ref, final_base, name="final")


def test_rejects_bad_arguments_with_clear_errors(world_of_one):
    q, k, v, h0 = make_inputs(1, 8, 2, 4, initial_state=True)
    g = decay.g_gamma(2, 0, 1)
    with pytest.raises(ValueError, match="k must have q's shape"):
        context_parallel_simple_gla(q, k[:, :4], v, g)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        context_parallel_simple_gla(q, k, v, g, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match=r"g_gamma must have shape \[H=2\]"):
        context_parallel_simple_gla(q, k, v, g[:1])
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        context_parallel_simple_gla(q, k, v, g, group="world")
    with pytest.raises(TypeError, match="unexpected keyword argument.*cu_seqlens"):
        context_parallel_lightning_attn(q, k, v, 0, 1, cu_seqlens=torch.tensor([0, 8]))


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q, k, v, _ = make_inputs(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_simple_gla(q, k, v, decay.g_gamma(2, 0, 1))
