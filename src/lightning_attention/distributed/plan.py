"""Where each shard sits on the token axis, and which sequence carries a state across each shard boundary.

Built on the host, identically on every rank, from the shard lengths ``L_r`` of all ranks (exchanged once per
call, see collectives.py) and the sequences' offsets: ``cu_seqlens`` of the whole packed axis (``T = sum L_r``),
or ``(0, T)`` when every batch row is one sequence spanning all shards. Rank r holds tokens
``[start_r, start_r + L_r)``; ranks follow each other along T in rank order.

Each rank sees its shard in *scan order* (first to last token, or last to first when ``reverse``); the scan
visits the ranks in scan order too (rank 0 first, or rank P - 1 first when reversed). In scan order a shard
begins with its *head* run, the tokens of the sequence the scan is in when it enters the shard, and ends with
its *tail* run, the tokens of the sequence it is in when it leaves::

    packed axis   | doc 0      | doc 1                          | doc 2 |     (reverse=False)
    shards        | rank 0        | rank 1        | rank 2        |
                            tail ^  ^ head   tail ^  ^ head

    head_open  the head sequence began on an earlier shard: its state enters from there (S_in)
    tail_open  the tail sequence goes on after this shard: its state leaves to later shards

A shard inside one sequence has head == tail (both runs are the whole shard); an empty shard has runs of length
0 and is open on both sides exactly when a sequence spans its position. One sequence per batch row
(``cu_seqlens`` None) is the case ``bounds = (0, T)``: every shard is one run, open on each side that has tokens
beyond it; the state enters the first shard from ``initial_state`` and leaves the last as ``final_state``.

Packed sequences are indexed by their position in ``cu_seqlens`` (0..N-1); a sequence of length 0 belongs to no
shard (its final state is its initial state).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = ["ShardPlan"]


@dataclass(frozen=True)
class Run:
    """The tokens of one sequence at one end of a shard: sequence index, token count, and whether the sequence
    continues past that end of the shard (its state crosses the boundary)."""

    seq: int | None
    length: int
    open: bool


@dataclass(frozen=True)
class ShardPlan:
    """lengths: ``L_r`` per rank (group rank order). bounds: the global ``cu_seqlens`` values, or None (one
    sequence per batch row). reverse: the scan direction. rank: this process's rank in the group."""

    lengths: tuple[int, ...]
    bounds: tuple[int, ...] | None
    reverse: bool
    rank: int

    # ----- geometry -------------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def packed(self) -> bool:
        return self.bounds is not None

    @cached_property
    def starts(self) -> tuple[int, ...]:
        out, pos = [], 0
        for length in self.lengths:
            out.append(pos)
            pos += length
        return tuple(out)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @cached_property
    def seq_bounds(self) -> tuple[int, ...]:
        return self.bounds if self.bounds is not None else (0, self.num_tokens)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_bounds) - 1

    def scan_order(self) -> list[int]:
        """Ranks in the order the scan visits them."""
        ranks = list(range(self.world_size))
        return ranks[::-1] if self.reverse else ranks

    def previous(self, rank: int) -> int | None:
        """The rank the scan visits just before ``rank`` (None for the first)."""
        order = self.scan_order()
        i = order.index(rank)
        return order[i - 1] if i > 0 else None

    def next(self, rank: int) -> int | None:
        order = self.scan_order()
        i = order.index(rank)
        return order[i + 1] if i + 1 < len(order) else None

    def _seq_at(self, token: int) -> int:
        """The (non-empty) sequence holding ``token``."""
        lo, hi = 0, self.num_seqs - 1
        b = self.seq_bounds
        while lo < hi:  # the last n with b[n] <= token
            mid = (lo + hi + 1) // 2
            if b[mid] <= token:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _crossing(self, position: int) -> int | None:
        """The sequence with tokens on both sides of ``position`` (between tokens position - 1 and position)."""
        if not 0 < position < self.num_tokens:
            return None
        n = self._seq_at(position)
        return n if self.seq_bounds[n] < position else None

    def local_seqs(self, rank: int) -> range:
        """Sequences with tokens on ``rank``, with the empty ones between them (real order)."""
        start, length = self.starts[rank], self.lengths[rank]
        if length == 0:
            return range(0)
        return range(self._seq_at(start), self._seq_at(start + length - 1) + 1)

    def local_bounds(self, rank: int) -> tuple[int, ...]:
        """``cu_seqlens`` of :meth:`local_seqs` within the shard (0-based, last == L_r)."""
        start, length = self.starts[rank], self.lengths[rank]
        seqs = self.local_seqs(rank)
        inner = [min(max(self.seq_bounds[n] - start, 0), length) for n in seqs[1:]]
        return (0, *inner, length) if len(seqs) else ()

    # ----- the runs at either end of a shard, in scan order ---------------------------------------------------

    def _first_last(self, rank: int) -> tuple[Run, Run]:
        """(run at the shard's first token, run at its last token), in real (ascending) order."""
        start, length = self.starts[rank], self.lengths[rank]
        end = start + length
        if length == 0:
            n = self._crossing(start)
            return Run(n, 0, n is not None), Run(n, 0, n is not None)
        first, last = self._seq_at(start), self._seq_at(end - 1)
        b = self.seq_bounds
        first_run = Run(first, min(b[first + 1], end) - start, b[first] < start)
        last_run = Run(last, end - max(b[last], start), b[last + 1] > end)
        return first_run, last_run

    def head(self, rank: int) -> Run:
        """The run the scan enters the shard with; ``open``: its state comes from the previous shard."""
        first, last = self._first_last(rank)
        return last if self.reverse else first

    def tail(self, rank: int) -> Run:
        """The run the scan leaves the shard with; ``open``: its state goes on to the next shard."""
        first, last = self._first_last(rank)
        return first if self.reverse else last

    def spans(self, rank: int) -> bool:
        """The head and tail runs are one sequence crossing the whole shard (its state passes through)."""
        head, tail = self.head(rank), self.tail(rank)
        return head.open and tail.open and head.seq == tail.seq

    # ----- what the state exchange needs ----------------------------------------------------------------------

    def chain_to(self, rank: int) -> list[int]:
        """Ranks whose tail states make up ``rank``'s incoming state, in scan order: the shard where the head
        sequence began (its state starts there from ``initial_state``), then every shard it spans."""
        return self._walk(rank, self.previous) if self.head(rank).open else []

    def chain_from(self, rank: int) -> list[int]:
        """Ranks whose head-run state gradients flow back into ``rank``'s tail, in reverse scan order: the shard
        where the tail sequence ends, then every shard it spans back to the next one."""
        return self._walk(rank, self.next) if self.tail(rank).open else []

    def _walk(self, rank: int, step) -> list[int]:
        """From ``rank``'s neighbour (``step``: previous or next) onwards while the sequence spans the shards, and
        the first one it does not span; returned farthest first."""
        ranks, r = [], step(rank)
        while r is not None:
            ranks.append(r)
            if not self.spans(r):
                break
            r = step(r)
        return ranks[::-1]
