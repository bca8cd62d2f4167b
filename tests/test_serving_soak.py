"""Serving soak: a simulated continuous-batching server on the public serving API, checked against float64.

The server keeps one layer's state cache and serves seeded random traffic. Every step it
- evicts finished requests and now and then cancels a running one: the final state is read from the slot, then the
  slot is filled with NaN (free slots start as NaN too), so that any later read of a freed slot shows;
- admits new requests into random free slots and extends random running ones by a few tokens (a chunked prompt,
  speculative tokens), all in one ``lightning_attn_prefill`` call with ``use_initial_state`` per sequence; prompts
  and extensions of 0 and 1 tokens included;
- decodes one token for a random subset of the running requests in random row order, padded to a fixed batch with
  slot -1 rows (holding NaN) at random places (``lightning_attn_decode``).
After every call the padding rows' outputs are exactly zero and every slot the call does not name is bit for bit
unchanged (no cross-talk, no write to a free slot). At the end every request ever admitted, finished or running, is
replayed in float64 on its whole token history (reference.recurrent_reference, from a zero state), and every
output of every step and the final state are compared with it: nothing lost, nothing mixed up.

Tolerance (lightning_attention.testing.assert_matches_baseline, per request, o over all its steps and the final
state): the baseline replays the same history in float32 call by call, rounding the state to the cache dtype after
every call and the outputs to the input dtype, where and as the backend rounds (round to nearest in torch, the
interpreter's truncation for Triton on CPU: tests/engines/triton/rounding.py). A bfloat16 cache adds one rounding of
the state per step (serving.py), which the baseline therefore has by construction: its error is the cost of the
cache's dtype, however the rounding errors add up along a request (a head without decay, g = 0, accumulates them
like a random walk). The factor 2 leaves room for the engines' summation order (the chunked prefill); the floors
are the ops' (tests/test_ops_properties.py): 1e-6 on the torch engine, 1e-5 for Triton (3xTF32 products of fp32
on a GPU). Triton runs float32 inputs: its prefill kernels also round their products' operands to a 16-bit input
dtype, which a float32 replay does not model (tests/engines/triton/test_chunk.py covers that with its own baseline).

Budget: a fixed number of steps per case in CI (~10-15 s each on 2 cores); ``--soak-seconds=S`` (tests/conftest.py)
runs each case for S seconds of traffic instead (at least as many steps).
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from lightning_attention.reference import recurrent_reference
from lightning_attention.serving import PADDING_SLOT, lightning_attn_decode, lightning_attn_prefill, new_state_cache
from lightning_attention.testing import assert_matches_baseline, strongest_decays
from tests.engines.triton.rounding import round_like_kernel

#: 4 heads: "tnl" layer 0's first and last (g = 0, no decay: the state is a growing sum; g = -7) and "minimax"
#: layer 0's strongest and weakest (g = -0.5; g = -2^-8, a memory of ~256 tokens).
G_GAMMA = torch.cat([strongest_decays()["tnl"][[0, -1]], strongest_decays()["minimax"][[0, -1]]])


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Shape of the simulated load."""

    heads: tuple[int, ...]  # which of G_GAMMA's heads
    num_slots: int
    head_k: int
    head_v: int
    decode_rows: int  # fixed decode batch (padded with slot -1)
    max_prompt: int
    max_new_tokens: int
    max_extension: int  # tokens appended to a running request by a prefill with its cached state
    ci_steps: int


TORCH_TRAFFIC = Traffic(heads=(0, 1, 2, 3), num_slots=16, head_k=32, head_v=48, decode_rows=8, max_prompt=96,
                        max_new_tokens=300, max_extension=8, ci_steps=3000)  # fmt: skip
#: Smaller for Triton, whose kernels run ~100x slower under the CPU interpreter (each program of a decode step,
#: one per row and head, costs ~10 ms there): the two heads whose state keeps the most history (g = 0 and
#: g = -2^-8), prompts around the prefill's switch from the token loop to the chunked kernels (16 tokens).
TRITON_TRAFFIC = Traffic(heads=(0, 3), num_slots=6, head_k=16, head_v=24, decode_rows=3, max_prompt=32,
                         max_new_tokens=30, max_extension=4, ci_steps=200)  # fmt: skip


@dataclasses.dataclass
class Request:
    """One sequence: its tokens and outputs call by call (a prefill chunk, or one decode step)."""

    rid: int
    slot: int
    target_len: int
    calls: list = dataclasses.field(default_factory=list)  # (q, k, v, o) per call, [L, H, D] each
    final_state: torch.Tensor | None = None  # read from the slot at eviction

    @property
    def length(self) -> int:
        return sum(c[0].shape[0] for c in self.calls)


class Server:
    def __init__(self, backend: str, device: str, dtype: torch.dtype, cache_dtype: torch.dtype, traffic: Traffic,
                 seed: int):  # fmt: skip
        self.backend, self.device, self.dtype, self.traffic = backend, device, dtype, traffic
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.g_gamma = G_GAMMA[list(traffic.heads)]
        self.heads = len(traffic.heads)
        self.cache = new_state_cache(
            num_slots=traffic.num_slots, num_heads=self.heads, head_k_dim=traffic.head_k, head_v_dim=traffic.head_v,
            dtype=cache_dtype, device=device,
        )  # fmt: skip
        self.cache.fill_(float("nan"))  # free slots hold garbage
        self.free = list(range(traffic.num_slots))
        self.running: dict[int, Request] = {}
        self.requests: list[Request] = []
        self.steps = self.prefill_calls = self.decode_calls = self.tokens = 0

    # --- traffic ---------------------------------------------------------------------------------------------
    def _tokens(self, n: int):
        """q, k [n, H, K], v [n, H, V] on the CPU, unit normal, in the input dtype."""
        t = self.traffic
        q, k = (torch.randn(n, self.heads, t.head_k, generator=self.gen) for _ in range(2))
        v = torch.randn(n, self.heads, t.head_v, generator=self.gen)
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)

    def _length(self, upper: int) -> int:
        """0 and 1 as often as any other length."""
        return self.rng.choice([0, 1, self.rng.randint(0, upper)])

    def _slot_ids(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=self.rng.choice([torch.int32, torch.int64]))

    def _bits(self) -> torch.Tensor:
        return self.cache.view(torch.int16 if self.cache.dtype == torch.bfloat16 else torch.int32).clone()

    def _call(self, named: list[int], run):
        """Run one serving call; check that it changed no slot it does not name."""
        before = self._bits()
        out = run()
        after = self._bits()
        others = [s for s in range(self.traffic.num_slots) if s not in named]
        changed = [s for s in others if not torch.equal(after[s], before[s])]
        assert not changed, f"step {self.steps}: slots {changed} changed, the call named only {named}"
        return out

    def step(self) -> None:
        self.steps += 1
        self._evict()
        self._prefill()
        self._decode()

    def _evict(self) -> None:
        for slot, r in list(self.running.items()):
            if r.length >= r.target_len or self.rng.random() < 0.005:
                r.final_state = self.cache[slot].cpu().clone()
                self.cache[slot] = float("nan")
                del self.running[slot]
                self.free.append(slot)

    def _prefill(self) -> None:
        t = self.traffic
        entries = []  # (request, tokens, use_initial_state)
        for r in self.rng.sample(list(self.running.values()), min(len(self.running), self.rng.choice([0, 0, 1, 2]))):
            entries.append((r, self._length(t.max_extension), True))
        for _ in range(self.rng.randint(0, min(2, len(self.free)))):
            slot = self.free.pop(self.rng.randrange(len(self.free)))
            prompt = self._length(t.max_prompt)
            r = Request(rid=len(self.requests), slot=slot, target_len=prompt + self.rng.randint(1, t.max_new_tokens))
            self.requests.append(r)
            self.running[slot] = r
            entries.append((r, prompt, False))
        if not entries:
            return
        self.rng.shuffle(entries)
        chunks = [self._tokens(n) for _, n, _ in entries]
        q, k, v = (torch.cat([c[i] for c in chunks])[None].to(self.device) for i in range(3))
        lengths = torch.tensor([0] + [n for _, n, _ in entries])
        cu = lengths.cumsum(0).to(self.rng.choice([torch.int32, torch.int64]))
        slots = [r.slot for r, _, _ in entries]
        use = torch.tensor([u for _, _, u in entries])
        o = self._call(slots, lambda: lightning_attn_prefill(
            q=q, k=k, v=v, cu_seqlens=cu.to(self.device), state_cache=self.cache, slot_ids=self._slot_ids(slots),
            g_gamma=self.g_gamma.to(self.device), use_initial_state=use, backend=self.backend,
        ))  # fmt: skip
        o = o[0].cpu()
        for (r, _, _), chunk, start, end in zip(entries, chunks, cu[:-1].tolist(), cu[1:].tolist()):
            r.calls.append((*chunk, o[start:end]))
        self.prefill_calls += 1
        self.tokens += int(cu[-1])

    def _decode(self) -> None:
        t = self.traffic
        chosen = self.rng.sample(list(self.running.values()), self.rng.randint(0, min(t.decode_rows, len(self.running))))
        rows = chosen + [None] * (t.decode_rows - len(chosen))
        self.rng.shuffle(rows)
        q, k, v = self._tokens(t.decode_rows)
        padding = torch.tensor([r is None for r in rows])
        for x in (q, k, v):
            x[padding] = float("nan")  # whatever a padding row holds never reaches an output or a slot
        slots = [PADDING_SLOT if r is None else r.slot for r in rows]
        o = self._call(slots, lambda: lightning_attn_decode(
            q=q.to(self.device), k=k.to(self.device), v=v.to(self.device), state_cache=self.cache,
            slot_ids=self._slot_ids(slots), g_gamma=self.g_gamma.to(self.device), backend=self.backend,
        ))  # fmt: skip
        o = o.cpu()
        assert torch.equal(o[padding], torch.zeros_like(o[padding])), f"step {self.steps}: padding rows' outputs"
        for n, r in enumerate(rows):
            if r is not None:
                r.calls.append((q[n : n + 1], k[n : n + 1], v[n : n + 1], o[n : n + 1]))
        self.decode_calls += 1
        self.tokens += len(chosen)

    def finish(self) -> None:
        for slot, r in self.running.items():
            r.final_state = self.cache[slot].cpu().clone()


def _round_like(backend: str, device: str, dtype: torch.dtype):
    """float32 -> dtype as the backend stores it (identity for float32)."""
    if backend == "triton":
        return lambda x: round_like_kernel(x, dtype, "cpu" if device == "cpu" else "cuda")
    return lambda x: x.to(dtype)


def _check_request(r: Request, server: Server, floor: float) -> None:
    """o of every call and the final state of one request against its float64 replay, relative to a float32 replay
    that rounds where the server rounds."""
    q, k, v, o = (torch.cat([c[i] for c in r.calls]) for i in range(4))
    g_gamma = server.g_gamma
    zero = torch.zeros(1, server.heads, server.traffic.head_k, server.traffic.head_v, dtype=torch.float64)
    o64, final64 = recurrent_reference(q=q.double()[None], k=k.double()[None], v=v.double()[None], g_gamma=g_gamma.double(),
                                       initial_state=zero, output_final_state=True)  # fmt: skip
    round_o = _round_like(server.backend, server.device, server.dtype)
    round_state = _round_like(server.backend, server.device, server.cache.dtype)
    state, outs = zero.float(), []
    for cq, ck, cv, _ in r.calls:
        call_o, state = recurrent_reference(q=cq.float()[None], k=ck.float()[None], v=cv.float()[None],
                                            g_gamma=g_gamma, initial_state=state, output_final_state=True)  # fmt: skip
        outs.append(round_o(call_o[0]))
        state = round_state(state).float()
    where = f"request {r.rid} (slot {r.slot}, {len(r.calls)} calls, {r.length} tokens)"
    assert_matches_baseline(o, o64[0], torch.cat(outs), name=f"{where}: o", floor=floor)
    assert_matches_baseline(r.final_state.float()[None], final64, state, name=f"{where}: final state", floor=floor)


CASES = [
    pytest.param("torch", torch.float32, torch.float32, id="torch-fp32-cache"),
    pytest.param("torch", torch.bfloat16, torch.bfloat16, id="torch-bf16-inputs-bf16-cache"),
    pytest.param("triton", torch.float32, torch.float32, id="triton-fp32-cache"),
    pytest.param("triton", torch.float32, torch.bfloat16, id="triton-bf16-cache"),
]


@pytest.mark.parametrize("backend, dtype, cache_dtype", CASES)
def test_serving_soak(request, backend, dtype, cache_dtype):
    device = "cpu" if backend == "torch" else request.getfixturevalue("triton_device")
    traffic = TORCH_TRAFFIC if backend == "torch" else TRITON_TRAFFIC
    seconds = request.config.getoption("--soak-seconds")
    server = Server(backend, device, dtype, cache_dtype, traffic, seed=0)
    start = time.monotonic()
    while server.steps < traffic.ci_steps or (seconds is not None and time.monotonic() - start < seconds):
        server.step()
    server.finish()
    floor = 1e-6 if backend == "torch" else 1e-5
    for r in server.requests:
        _check_request(r, server, floor)
    assert server.tokens == sum(r.length for r in server.requests), "tokens served != tokens in the requests"
    # (the figures of the run, in a JUnit report: pytest --junitxml=FILE -o junit_family=xunit1)
    counts = dict(steps=server.steps, prefill_calls=server.prefill_calls, decode_calls=server.decode_calls,
                  tokens=server.tokens, requests=len(server.requests), longest_request=max(r.length for r in server.requests))  # fmt: skip
    request.node.user_properties.extend(counts.items())
