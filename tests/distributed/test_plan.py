"""The shard plan against a token-by-token reading of the same layout (no process group needed).

Random layouts: shard lengths with zeros, documents with lengths 0 and 1, documents over many shards, both scan
directions, and one sequence per row (``bounds`` None).
"""

from __future__ import annotations

import random

import pytest

from lightning_attention.distributed.plan import ShardPlan


def _layouts(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        P = rng.choice([1, 2, 3, 4, 5, 8])
        lengths = tuple(rng.choice([0, 0, 1, 2, 3, 7, 16]) for _ in range(P))
        T = sum(lengths)
        bounds = None
        if rng.random() < 0.8:
            cuts = sorted(rng.randint(0, T) for _ in range(rng.randint(0, 6)))
            bounds = (0, *cuts, T)
        yield lengths, bounds, rng.random() < 0.5


def _seq_of_tokens(bounds, T):
    seq = []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq += [n] * (b - a)
    assert len(seq) == T
    return seq


def _expected_runs(lengths, bounds, reverse, rank):
    """(head, tail) as (seq, length, open) read token by token in scan order."""
    T = sum(lengths)
    bounds = bounds if bounds is not None else (0, T)
    seq = _seq_of_tokens(bounds, T)
    start = sum(lengths[:rank])
    end = start + lengths[rank]
    tokens = list(range(start, end))
    if reverse:
        tokens = tokens[::-1]
    if not tokens:  # an empty shard: open on both sides iff one sequence has tokens on both sides of it
        crossing = next((n for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if a < start < b), None)
        run = (crossing, 0, crossing is not None)
        return run, run
    before = tokens[0] + (1 if reverse else -1)  # the token the scan visits just before the shard
    after = tokens[-1] + (-1 if reverse else 1)
    head_seq, tail_seq = seq[tokens[0]], seq[tokens[-1]]
    head_len = next((i for i, t in enumerate(tokens) if seq[t] != head_seq), len(tokens))
    tail_len = next((i for i, t in enumerate(tokens[::-1]) if seq[t] != tail_seq), len(tokens))
    head_open = 0 <= before < T and seq[before] == head_seq
    tail_open = 0 <= after < T and seq[after] == tail_seq
    return (head_seq, head_len, head_open), (tail_seq, tail_len, tail_open)


LAYOUTS = list(_layouts(400))


@pytest.mark.parametrize("chunk", [pytest.param(i, id=f"layouts{i * 100}-{i * 100 + 99}") for i in range(4)])
def test_runs_and_local_documents_match_a_token_by_token_reading(chunk):
    for lengths, bounds, reverse in LAYOUTS[chunk * 100 : (chunk + 1) * 100]:
        T = sum(lengths)
        for rank in range(len(lengths)):
            plan = ShardPlan(lengths, bounds, reverse, rank)
            where = f"lengths={lengths} bounds={bounds} reverse={reverse} rank={rank}"
            head, tail = plan.head(rank), plan.tail(rank)
            assert ((head.seq, head.length, head.open), (tail.seq, tail.length, tail.open)) == _expected_runs(
                lengths, bounds, reverse, rank
            ), where
            if bounds is None:
                continue
            # Local documents: every document with a token here, with their local offsets.
            start, end = plan.starts[rank], plan.starts[rank] + lengths[rank]
            seqs, local = plan.local_seqs(rank), plan.local_bounds(rank)
            owners = set(_seq_of_tokens(bounds, T)[start:end])
            assert owners == {n for n in seqs if bounds[n + 1] > bounds[n]}, where
            if lengths[rank]:
                assert local[0] == 0 and local[-1] == lengths[rank] and len(local) == len(seqs) + 1, where
                for i, n in enumerate(seqs):
                    assert local[i + 1] - local[i] == min(bounds[n + 1], end) - max(bounds[n], start), where


def test_chains_follow_the_sequence_across_shards():
    for lengths, bounds, reverse in LAYOUTS:
        for rank in range(len(lengths)):
            plan = ShardPlan(lengths, bounds, reverse, rank)
            head, tail = plan.head(rank), plan.tail(rank)
            order = plan.scan_order()
            into = plan.chain_to(rank)
            assert bool(into) == head.open
            if into:  # consecutive shards just before this one, all holding the head sequence
                assert into == order[order.index(rank) - len(into) : order.index(rank)]
                assert all(plan.tail(r).seq == head.seq and plan.tail(r).open for r in into)
                assert not plan.head(into[0]).open or plan.head(into[0]).seq != head.seq  # it begins there
                assert all(plan.spans(r) for r in into[1:])
            back = plan.chain_from(rank)
            assert bool(back) == tail.open
            if back:  # consecutive shards just after, last one first, all entered by the tail sequence
                assert back[::-1] == order[order.index(rank) + 1 : order.index(rank) + 1 + len(back)]
                assert all(plan.head(r).seq == tail.seq and plan.head(r).open for r in back)
                assert not plan.spans(back[0])  # it ends there
                assert all(plan.spans(r) for r in back[1:])


def test_one_sequence_per_row_is_one_document_over_all_tokens():
    plan = ShardPlan((0, 5, 0, 7, 0), None, False, 3)
    assert plan.num_seqs == 1 and plan.seq_bounds == (0, 12)
    assert [plan.head(r).open for r in range(5)] == [False, False, True, True, False]
    assert [plan.tail(r).open for r in range(5)] == [False, True, True, False, False]
    assert plan.chain_to(3) == [1, 2] and plan.chain_from(1) == [3, 2]
