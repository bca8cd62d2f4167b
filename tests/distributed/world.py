"""Spawned gloo worlds for the distributed tests, bounded in time.

A *job* is a function ``job(ctx: RankContext) -> result`` registered with :func:`rank_job`; it runs on every rank
of a world (2 or 4 processes, each a fresh ``spawn``ed interpreter with one torch thread and NaN-filled
``torch.empty`` as in tests/conftest.py). Every registered job runs in one world per size, spawned once for the
test run (tests/distributed/conftest.py): spawning is most of the cost on a small CI machine.

An exception inside a job becomes that rank's result (a string starting with FAILED or ERROR), so the other jobs
still run; a job that leaves the other ranks waiting in a collective is cut off by the process group's timeout,
and a world that does not finish within ``deadline_s`` is killed and reported.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["RankContext", "rank_job", "registered_jobs", "run_world", "run_world_or_fail"]

#: name -> (module, function name, world sizes). Filled when the test modules are imported (collection).
_JOBS: dict[str, tuple[str, str, tuple[int, ...]]] = {}


@dataclass
class RankContext:
    rank: int
    world_size: int
    groups: dict = field(default_factory=dict)  # "odd": the subgroup of odd ranks (group ranks != global ranks)
    store: object = None  # the world's dist.FileStore

    def start_together(self, name: str, timeout_s: float = 60.0) -> None:
        """Return once every rank has called this with ``name``: a wait on the store, not a collective, so not
        bound by the process group's timeout (a rank still importing on a loaded machine may be seconds late)."""
        self.store.add(name, 1)
        end = time.monotonic() + timeout_s
        while int(self.store.add(name, 0)) < self.world_size:
            if time.monotonic() > end:
                raise TimeoutError(f"not every rank reached {name!r} within {timeout_s:.0f}s")
            time.sleep(0.01)


def rank_job(world_sizes: tuple[int, ...] = (2, 4)):
    """Register ``fn(ctx)`` to run on every rank of the shared worlds of these sizes; its name is the key."""

    def register(fn):
        _JOBS[f"{fn.__module__}.{fn.__name__}"] = (fn.__module__, fn.__name__, tuple(world_sizes))
        return fn

    return register


def registered_jobs(world_size: int) -> list[tuple[str, str, str]]:
    return [(name, mod, fn) for name, (mod, fn, sizes) in _JOBS.items() if world_size in sizes]


def _poison_empty() -> None:
    """The NaN-filled allocations of tests/conftest.py, for a spawned process (no pytest fixtures there)."""
    from tests import conftest

    torch.empty = lambda *a, **kw: conftest._poisoned(conftest._real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: conftest._poisoned(conftest._real_empty_like(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: conftest._poisoned(conftest._real_new_empty(self, *a, **kw))


def _worker(rank, world_size, store_path, out_dir, jobs, pg_timeout_s, teardown) -> None:
    torch.set_num_threads(1)
    _poison_empty()
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
    )
    ctx = RankContext(rank, world_size, {"odd": dist.new_group([r for r in range(world_size) if r % 2 == 1])}, store)
    results = {}
    for name, module, fn_name in jobs:
        fn = getattr(importlib.import_module(module), fn_name)
        try:
            results[name] = fn(ctx)
        except AssertionError as exc:
            results[name] = f"FAILED: {exc}"
        except Exception:  # report it; the other jobs still run
            results[name] = "ERROR: " + traceback.format_exc()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if teardown:
        # Tear down only once every rank is done: a rank destroying its gloo pairs while a peer still sends
        # can abort the process.
        dist.barrier()
        dist.destroy_process_group()
    else:  # the group may be broken on purpose (a rank that died): leave without touching it
        os._exit(0)


def run_world(world_size: int, jobs, deadline_s: float = 90.0, pg_timeout_s: float = 30.0, teardown: bool = True):
    """Run ``jobs`` [(name, module, function name)] on ``world_size`` spawned ranks.

    Returns ``(results, problems)``: per rank a dict name -> result (what it wrote before exiting), and a list
    of strings describing ranks that crashed, exited with an error code, or were killed at the deadline."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, str(Path(tmp) / "store"), tmp, list(jobs), pg_timeout_s, teardown),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        problems = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                problems.append(f"rank {r} killed after the {deadline_s:.0f}s deadline")
            elif p.exitcode != 0:
                problems.append(f"rank {r} exited with code {p.exitcode}")
        results = []
        for r in range(world_size):
            path = Path(tmp) / f"rank{r}.pt"
            results.append(torch.load(path, weights_only=False) if path.exists() else {})
    return results, problems


def run_world_or_fail(world_size: int, jobs, **kwargs):
    """:func:`run_world`, raising AssertionError if any rank crashed or hit the deadline."""
    results, problems = run_world(world_size, jobs, **kwargs)
    assert not problems, f"world of {world_size}: {problems}"
    return results
