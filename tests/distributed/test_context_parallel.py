"""Context parallelism on CPU with gloo: 1 (in process), 2 and 4 processes against the single-process op.

The cases run as jobs in the shared spawned worlds (tests/distributed/world.py); every rank compares its shard
of the output and of the gradients (q, k, v, per-token gates g where given, its part of dh0, and the group sum of
dh0) with the exact float64 reference (autograd through it on the whole sequence), judged against the single-process
op in the same dtype (lightning_attention.testing). The loss is the
sum of per-rank losses, each with its own weight on the replicated final state, so the summation of final-state
gradients across ranks is exercised too. Packed cases (``docs``) put documents of length 0, 1 and more across
shard boundaries, through empty shards and over 3+ shards.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.distributed import context_parallel_lightning_attn, context_parallel_simple_gla
from lightning_attention.engines import triton_available
from lightning_attention.reference import chunk_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs
from tests.distributed.world import rank_job


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
    # Packed documents (B = 1): their lengths along the whole token axis, the last one taking what remains.
    docs: tuple[int, ...] | None = None
    gates: bool = False  # per-token gates g (GATE_STRENGTH), with the schedule's g_gamma if ``g_gamma``
    g_gamma: bool = True
    g_dtype: torch.dtype | None = None  # g's dtype (None: q's)


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
    # Packed documents. World 2 holds the first two shards; world 4 adds documents over 3 and 4 shards.
    Case("packed-span-all", (10, 12, 9, 11), docs=(3, 36)),  # doc 1: ranks 0-3 (world 2: 0-1, ends there)
    Case("packed-span-reverse", (10, 12, 9, 11), docs=(3, 36), reverse=True),
    Case("packed-empty-and-short", (7, 0, 18, 9), docs=(0, 1, 5, 0, 0, 12, 1, 0, 9)),  # 0/1-token documents
    Case("packed-on-boundaries", (8, 8, 8, 8), docs=(8, 0, 8, 4, 12)),  # documents ending exactly at shards
    Case("packed-empty-spanned", (6, 0, 0, 14), docs=(2, 10), reverse=True),  # a document through empty shards
    Case("packed-many-per-shard", (30, 25, 3, 14), docs=(2, 3, 1, 7, 4, 9, 2, 11, 6, 1), final_state=False),
    Case("packed-no-state", (13, 17, 21, 8), docs=(20, 25), initial_state=False, final_state=False),
    Case("packed-final-only", (13, 17, 21, 8), docs=(1, 30, 0, 4), initial_state=False, reverse=True),
    Case("packed-bf16", (20, 30, 10, 20), docs=(15, 40, 1), dtype=torch.bfloat16, schedule="minimax"),
    Case("packed-fp64", (11, 19, 13, 7), docs=(4, 22, 9), dtype=torch.float64, layer_idx=2),
    Case("packed-subgroup", (9, 14, 7, 7), docs=(5, 13, 0), odd_ranks_only=True),
    Case("packed-lightning-api", (12, 12, 12, 12), docs=(5, 30), api="lightning", reverse=True),
    Case(
        "packed-triton", (18, 11), docs=(4, 20, 1), K=16, V=16, H=2, reverse=True, backend="triton",
        world_sizes=(2,),
    ),  # fmt: skip
    # Per-token gates, alone and with g_gamma: dg too.
    Case("gates-alone", (24, 17, 1, 30), B=2, gates=True, g_gamma=False),
    Case("gates-and-g-gamma-reverse", (24, 13, 0, 30), gates=True, reverse=True),
    Case("gates-bf16-fp32-gates", (40, 24, 32, 24), dtype=torch.bfloat16, schedule="minimax", gates=True,
         g_dtype=torch.float32),  # fmt: skip
    Case("gates-fp64", (24, 19, 24, 24), dtype=torch.float64, layer_idx=3, gates=True, reverse=True),
    Case("gates-no-state", (20, 12, 28, 4), gates=True, initial_state=False, final_state=False),
    Case("packed-gates-empty-and-short", (7, 0, 18, 9), docs=(0, 1, 5, 0, 0, 12, 1, 0, 9), gates=True, g_gamma=False),
    Case("packed-gates-span-reverse", (10, 12, 9, 11), docs=(3, 36), gates=True, reverse=True),
    Case("packed-gates-fp64", (11, 19, 13, 7), docs=(4, 22, 9), dtype=torch.float64, gates=True, final_state=False),
    Case("triton-gates", (20, 9), K=16, V=16, H=2, gates=True, g_gamma=False, backend="triton", world_sizes=(2,)),
    Case(
        "packed-triton-gates", (18, 11), docs=(4, 20, 1), K=16, V=16, H=2, reverse=True, gates=True,
        backend="triton", world_sizes=(2,),
    ),  # fmt: skip
]
NUM_LAYERS = 4
CHUNK = 16  # small, so shards span several chunks and end in partial ones
FLOOR = {torch.float64: 1e-12}
#: Per-token gates: log-sigmoid of a unit normal times a strength per head (cycled): no decay (g = 0), moderate,
#: mild, and strong (-8 logsigmoid reaches -20 per token and more: most cross-shard weights underflow).
GATE_STRENGTH = (0.0, 1.0, 0.1, 8.0)


def _gates(case: Case, T: int) -> torch.Tensor | None:
    if not case.gates:
        return None
    gen = torch.Generator().manual_seed(13)
    strength = torch.tensor([GATE_STRENGTH[h % len(GATE_STRENGTH)] for h in range(case.H)], dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(case.B, T, case.H, generator=gen, dtype=torch.float64)) * strength
    return g.to(case.g_dtype or case.dtype)


def _doc_bounds(case: Case, T: int) -> tuple[int, ...] | None:
    if case.docs is None:
        return None
    bounds = [0]
    for n in case.docs:
        bounds.append(min(T, bounds[-1] + n))
    return (*bounds, T)


def _first_scanned_owner(case: Case, docs: tuple[int, ...], shard_bounds: list[int]) -> list[int]:
    """Per document, the rank whose part of dh0 is the whole gradient (the packed rule, module docstring of
    lightning_attention.distributed.context_parallel)."""
    P = len(shard_bounds) - 1
    owners = []
    for start, end in zip(docs[:-1], docs[1:]):
        if start == end:
            owners.append(P - 1 if case.reverse else 0)
            continue
        token = end - 1 if case.reverse else start
        owners.append(next(r for r in range(P) if shard_bounds[r] <= token < shard_bounds[r + 1]))
    return owners


def _full_results(case: Case, q, k, v, h0, gates, g_gamma, scale, w_o, w_f, bounds, cu, exact: bool):
    """Single-process outputs and gradients: of the total loss, and dh0 of each rank's own loss.

    ``exact``: the float64 reference (inputs upcast); else the op itself in the inputs' dtype."""
    dtype = torch.float64 if exact else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    if gates is not None:
        gates = gates.detach().to(torch.float64 if exact else gates.dtype).requires_grad_(True)
    if h0 is not None:
        h0 = h0.detach().to(torch.float64 if exact else h0.dtype).requires_grad_(True)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    options = dict(scale=scale, initial_state=h0, output_final_state=case.final_state, reverse=case.reverse)
    if exact:
        o, final = chunk_reference(
            *leaves, g_gamma=g_gamma, g=gates, cu_seqlens=cu_seqlens, chunk_size=CHUNK, **options
        )
    else:
        o, final = chunk_simple_gla(
            *leaves, gates, g_gamma, cu_seqlens=cu_seqlens, chunk_size=CHUNK, backend=case.backend, **options
        )
    rank_losses = []
    for r, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        loss = (o[:, start:end].double() * w_o[:, start:end].double()).sum()
        if case.final_state:
            loss = loss + (final.double() * w_f[r].double()).sum()
        rank_losses.append(loss)
    inputs = leaves + ([h0] if h0 is not None else []) + ([gates] if gates is not None else [])
    grads = torch.autograd.grad(sum(rank_losses), inputs, retain_graph=True)
    out = {"o": o.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if gates is not None:
        out["dg"] = grads[-1]
    if final is not None:
        out["final"] = final.detach()
    if h0 is not None:
        out["dh0_sum"] = grads[3]
        if cu is None:
            out["dh0_share"] = [torch.autograd.grad(loss, h0, retain_graph=True)[0] for loss in rank_losses]
        else:
            owners = _first_scanned_owner(case, cu, bounds)
            out["dh0_part"] = [
                grads[3] * torch.tensor([o == r for o in owners], dtype=grads[3].dtype)[:, None, None, None]
                for r in range(len(bounds) - 1)
            ]
    return out


def _triton_runs_on_cpu() -> bool:
    return triton_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _run_case(case: Case, group, rank: int, world_size: int) -> list[str]:
    """Returns the names of the tensors checked on this rank; raises AssertionError on a mismatch."""
    shards = case.shards[:world_size]
    bounds = [sum(shards[:r]) for r in range(world_size + 1)]
    T = bounds[-1]
    cu = _doc_bounds(case, T)
    N = case.B if cu is None else len(cu) - 1
    q, k, v, h0 = make_inputs(
        case.B, T, case.H, case.K, case.V, case.dtype, seed=7, initial_state=case.initial_state, num_seqs=N
    )
    gen = torch.Generator().manual_seed(11)
    w_o = torch.randn(case.B, T, case.H, case.V, generator=gen, dtype=torch.float64)
    w_f = torch.randn(world_size, N, case.H, case.K, case.V, generator=gen, dtype=torch.float64)
    g_gamma = decay.g_gamma(case.H, case.layer_idx, NUM_LAYERS, schedule=case.schedule) if case.g_gamma else None
    gates = _gates(case, T)
    scale = decay.default_scale(case.schedule, case.K)

    ref = _full_results(case, q, k, v, h0, gates, g_gamma, scale, w_o, w_f, bounds, cu, exact=True)
    base = _full_results(case, q, k, v, h0, gates, g_gamma, scale, w_o, w_f, bounds, cu, exact=False)

    sl = slice(bounds[rank], bounds[rank + 1])
    mine = [x[:, sl].detach().clone().requires_grad_(True) for x in (q, k, v)]
    my_gates = gates[:, sl].clone().requires_grad_(True) if gates is not None else None
    my_h0 = h0.clone().requires_grad_(True) if h0 is not None else None
    options = dict(
        initial_state=my_h0, output_final_state=case.final_state, group=group, reverse=case.reverse,
        chunk_size=CHUNK, backend=case.backend, cu_seqlens=None if cu is None else torch.tensor(cu),
    )  # fmt: skip
    if case.api == "lightning":
        o, final = context_parallel_lightning_attn(*mine, case.layer_idx, NUM_LAYERS, schedule=case.schedule, **options)
    else:
        o, final = context_parallel_simple_gla(*mine, my_gates, g_gamma, scale=scale, **options)  # fla's order
    assert (final is None) == (not case.final_state), "final_state returned iff asked for"
    loss = (o.double() * w_o[:, sl]).sum()
    if final is not None:
        loss = loss + (final.double() * w_f[rank]).sum()
    loss.backward()

    floor = FLOOR.get(case.dtype, 1e-6)
    checks = {"o": (o, ref["o"][:, sl], base["o"][:, sl])}
    for name, leaf in zip(("dq", "dk", "dv", "dg"), mine + ([my_gates] if gates is not None else [])):
        checks[name] = (leaf.grad, ref[name][:, sl], base[name][:, sl])
    if final is not None:
        checks["final"] = (final, ref["final"], base["final"])
    if my_h0 is not None:
        part = "dh0_share" if cu is None else "dh0_part"
        checks[part] = (my_h0.grad, ref[part][rank], base[part][rank])
        dh0_sum = my_h0.grad.clone()
        dist.all_reduce(dh0_sum, group=group)
        checks["dh0_sum"] = (dh0_sum, ref["dh0_sum"], base["dh0_sum"])
    for name, (got, exact, baseline) in checks.items():
        assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype}, expected {baseline.dtype}"
        assert_matches_baseline(got, exact, baseline, name=f"rank {rank} {name}", floor=floor)
    return sorted(checks)


@rank_job()
def cases_job(ctx) -> dict:
    """Every case this world runs: case id -> checked tensor names, or the failure."""
    results = {}
    for case in CASES:
        if ctx.world_size not in case.world_sizes or (case.backend == "triton" and not _triton_runs_on_cpu()):
            continue
        if case.odd_ranks_only and ctx.rank % 2 == 0:
            continue
        group = ctx.groups["odd"] if case.odd_ranks_only else None
        members = ctx.world_size // 2 if case.odd_ranks_only else ctx.world_size
        try:
            results[case.id] = _run_case(case, group, dist.get_rank(group), members)
        except AssertionError as exc:
            results[case.id] = f"FAILED: {exc}"
        except Exception:  # report, don't hang the other ranks' result collection
            results[case.id] = "ERROR: " + traceback.format_exc()
    return results


@rank_job()
def chain_job(ctx) -> list[str]:
    """Two calls in a row, the second starting from the first's final state (not detached) and with per-token gates:
    the summed final-state gradients and the per-rank dh0 shares must compose into the single-process chain's
    gradients."""
    rank, world_size = ctx.rank, ctx.world_size
    T, shard = 16 * world_size, 16
    inputs = [make_inputs(1, T, 2, 8, seed=s, initial_state=True) for s in (3, 4)]
    (qa, ka, va, h0), (qb, kb, vb, _) = inputs
    gen = torch.Generator().manual_seed(5)
    w_a, w_b = (torch.randn(1, T, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    w_f = torch.randn(world_size, 1, 2, 8, 8, generator=gen, dtype=torch.float64)
    g = decay.g_gamma(2, 0, 2)
    gates = _gates(Case("chain", (T,), H=2, gates=True), T)
    leaves = {"qa": qa, "ka": ka, "va": va, "qb": qb, "kb": kb, "vb": vb, "gb": gates, "h0": h0}

    def chain(run, tensors, sl, final_weight):
        first_o, first_final = run(tensors["qa"], tensors["ka"], tensors["va"], None, tensors["h0"])
        second_o, second_final = run(tensors["qb"], tensors["kb"], tensors["vb"], tensors["gb"], first_final)
        loss = (first_o.double() * w_a[:, sl]).sum() + (second_o.double() * w_b[:, sl]).sum()
        return loss + (second_final.double() * final_weight).sum()

    def single(dtype, run):
        tensors = {name: t.detach().to(dtype).requires_grad_(True) for name, t in leaves.items()}
        loss = chain(run, tensors, slice(None), w_f.sum(0))
        return dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values()))))

    def ref_run(q, k, v, gates, s):
        return chunk_reference(
            q, k, v, g_gamma=g, g=gates, initial_state=s, output_final_state=True, chunk_size=CHUNK
        )

    def base_run(q, k, v, gates, s):
        return chunk_simple_gla(q, k, v, gates, g, initial_state=s, output_final_state=True, chunk_size=CHUNK)

    ref, base = single(torch.float64, ref_run), single(torch.float32, base_run)
    sl = slice(rank * shard, (rank + 1) * shard)
    mine = {n: (t[:, sl] if n != "h0" else t).detach().clone().requires_grad_(True) for n, t in leaves.items()}

    def cp_run(q, k, v, gates, state):
        return context_parallel_simple_gla(
            q, k, v, gates, g, initial_state=state, output_final_state=True, chunk_size=CHUNK
        )

    chain(cp_run, mine, sl, w_f[rank]).backward()
    dist.all_reduce(mine["h0"].grad)
    for name, t in mine.items():
        exact, baseline = (ref[name], base[name]) if name == "h0" else (ref[name][:, sl], base[name][:, sl])
        assert_matches_baseline(t.grad, exact, baseline, name=f"rank {rank} chained d{name}")
    return sorted(mine)


def _outcomes(world, job) -> list:
    world_size, results = world
    return [results[r].get(f"{job.__module__}.{job.__name__}", "not run") for r in range(world_size)]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_single_process(world, case):
    world_size, _ = world
    if world_size not in case.world_sizes:
        pytest.skip(f"{case.id} runs on {case.world_sizes} processes")
    if case.backend == "triton" and not _triton_runs_on_cpu():
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the CP tests run on CPU tensors)")
    ranks = [r for r in range(world_size) if r % 2 == 1] if case.odd_ranks_only else range(world_size)
    expected = {"o", "dq", "dk", "dv"} | ({"final"} if case.final_state else set()) | ({"dg"} if case.gates else set())
    if case.initial_state:
        expected |= {"dh0_share" if case.docs is None else "dh0_part", "dh0_sum"}
    per_rank = _outcomes(world, cases_job)
    for r in ranks:
        assert isinstance(per_rank[r], dict), f"rank {r}: {per_rank[r]}"
        outcome = per_rank[r].get(case.id, "not run")
        assert not isinstance(outcome, str), f"rank {r}: {outcome}"
        assert set(outcome) == expected, f"rank {r} checked {outcome}"


def test_chained_calls_match_single_process(world):
    for r, outcome in enumerate(_outcomes(world, chain_job)):
        assert not isinstance(outcome, str), f"rank {r}: {outcome}"
        assert outcome == ["gb", "h0", "ka", "kb", "qa", "qb", "va", "vb"], f"rank {r} checked {outcome}"


# ---------------------------------------------------------------------------------------------------------
# In process: world size 1 and validation.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("reverse", [pytest.param(False, id="forward"), pytest.param(True, id="reverse")])
@pytest.mark.parametrize("packed", [pytest.param(False, id="rows"), pytest.param(True, id="packed")])
@pytest.mark.parametrize("gates", [pytest.param(False, id="g_gamma"), pytest.param(True, id="gates")])
def test_world_of_one_is_the_single_device_op(world_of_one, reverse, packed, gates):
    B, N = (1, 3) if packed else (2, 2)
    q, k, v, h0 = make_inputs(B, 45, 3, 8, 6, initial_state=True, requires_grad=True, num_seqs=N)
    cu = torch.tensor([0, 20, 20, 45]) if packed else None
    g_gamma = decay.g_gamma(3, 0, 2)
    g = _gates(Case("one", (45,), B=B, H=3, gates=True), 45).requires_grad_(True) if gates else None
    leaves = [t for t in (q, k, v, h0, g) if t is not None]
    options = dict(output_final_state=True, reverse=reverse, chunk_size=CHUNK, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1)
    w_o, w_f = torch.randn(B, 45, 3, 6, generator=gen), torch.randn(N, 3, 8, 6, generator=gen)

    def results(op, q, k, v, h0, g=None):
        o, final = op(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, **options)
        loss = (o.double() * w_o).sum() + (final.double() * w_f).sum()
        return [o, final, *torch.autograd.grad(loss, [q, k, v, h0] + ([g] if g is not None else []))]

    got = results(context_parallel_simple_gla, *leaves)
    exact = results(chunk_reference, *[x.detach().double().requires_grad_(True) for x in leaves])
    baseline = results(chunk_simple_gla, *[x.detach().clone().requires_grad_(True) for x in leaves])
    for name, mine, ref, base in zip(("o", "final", "dq", "dk", "dv", "dh0", "dg"), got, exact, baseline):
        assert_matches_baseline(mine, ref, base, name=name)


def test_rejects_bad_arguments_with_clear_errors(world_of_one):
    q, k, v, h0 = make_inputs(1, 8, 2, 4, initial_state=True)
    g = decay.g_gamma(2, 0, 1)
    with pytest.raises(ValueError, match="k must have q's shape"):
        context_parallel_simple_gla(q, k[:, :4], v, g_gamma=g)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        context_parallel_simple_gla(q, k, v, g_gamma=g, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match=r"g_gamma must have shape \[H=2\]"):
        context_parallel_simple_gla(q, k, v, g_gamma=g[:1])
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        context_parallel_simple_gla(q, k, v, g_gamma=g, group="world")
    with pytest.raises(TypeError, match="unexpected keyword argument.*cu_seqlens_cpu"):
        context_parallel_lightning_attn(q, k, v, 0, 1, cu_seqlens_cpu=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal T=8"):
        context_parallel_simple_gla(q, k, v, g_gamma=g, cu_seqlens=torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match=r"initial_state must have shape .* \(N = number of sequences\)"):
        context_parallel_simple_gla(q, k, v, g_gamma=g, initial_state=h0, cu_seqlens=torch.tensor([0, 3, 8]))
    q2, k2, v2, _ = make_inputs(2, 8, 2, 4)
    with pytest.raises(ValueError, match="with cu_seqlens the batch size must be 1"):
        context_parallel_simple_gla(q2, k2, v2, g_gamma=g, cu_seqlens=torch.tensor([0, 8]))
    # fla's order: g (per-token gates) 4th, g_gamma 5th. A per-head [H] tensor in g's place is never reinterpreted.
    with pytest.raises(ValueError, match=r"a constant per-head log-decay \[H\] is g_gamma.*pass g_gamma="):
        context_parallel_simple_gla(q, k, v, g)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\] = \[1, 8, 2\] .*got \(1, 7, 2\)"):
        context_parallel_simple_gla(q, k, v, torch.zeros(1, 7, 2))
    with pytest.raises(TypeError, match="g must be a floating tensor"):
        context_parallel_simple_gla(q, k, v, torch.zeros(1, 8, 2, dtype=torch.int64))


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q, k, v, _ = make_inputs(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_simple_gla(q, k, v, g_gamma=decay.g_gamma(2, 0, 1))
