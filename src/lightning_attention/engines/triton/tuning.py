"""Launch configurations per card: the tables measured on each card, a user's own, and the lookup.

Each Triton kernel has a small configuration (tiles, warps, pipeline stages, ...) per *case* (a dtype and head-size
class). The values depend on the card, so they live in one table per card:

* shipped tables (:data:`SHIPPED`), measured on the cards named there (benchmarks/results/<card>/: the sweeps of
  kernel_choices.md, serving.md, recurrent.md, or ``python -m lightning_attention tune``'s tuning.md);
* a user's own table for the present card, written by the same command to :func:`user_table_path` and used in
  preference to the shipped one (``python -m lightning_attention check`` prints which table is in use).

Nothing is tuned implicitly at run time. A card with no table of its own uses the shipped table of the nearest card
(the same model, e.g. another H100 variant; else the same compute capability with the closest multiprocessor
count; else the first table) and says so once.

A table maps ``kernel -> case -> {field: value}``; the kernel modules turn the fields into their config dataclasses
and own the meaning of each case (``chunk_scan.scan_case``, ``chunk_bwd.dkdv_config``, ``decode.decode_config``,
``recurrent.recurrent_config``). A table may hold only some cases: a user's falls back to the shipped table serving
the card, and a shipped one to the first, complete table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "CardTable",
    "SHIPPED",
    "table_for",
    "find",
    "lookup",
    "user_table_path",
    "card_slug",
    "card_model",
    "write_user_table",
    "using",
    "cached",
    "describe",
]

#: Decode tiles (block_v, block_k, num_warps) that ``tune`` and the serving benchmark's sweep try: every one whose
#: K x V block holds 16 to 128 fp32 state values per thread (more spill; fewer leave too few loads in flight).
DECODE_TILES = [
    (block_v, block_k, warps)
    for block_v in (32, 64, 128)
    for block_k in (32, 64, 128)
    for warps in (1, 2, 4, 8)
    if 16 <= block_k * block_v // (32 * warps) <= 128
]

#: Environment variable naming the folder of user tables (default ~/.cache/lightning_attention/tuning).
TUNING_DIR_VARIABLE = "LIGHTNING_ATTENTION_TUNING_DIR"


@dataclass(frozen=True)
class CardTable:
    """Configurations measured on one card: ``entries[kernel][case]`` = field values."""

    card: str
    capability: tuple[int, int]
    sms: int
    entries: dict[str, dict[str, dict]] = field(default_factory=dict)
    source: str = "shipped"

    def get(self, kernel: str, case: str) -> dict | None:
        return self.entries.get(kernel, {}).get(case)


def card_model(card: str) -> str | None:
    """The model in a device name: "H100" in "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe"."""
    match = re.search(r"\b[A-Z]+\d{2,}\b", card)
    return match.group(0) if match else None


def card_slug(card: str) -> str:
    """A file-name form of a card name: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"."""
    return re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")


def user_table_path(card: str) -> Path:
    """Where ``python -m lightning_attention tune`` writes the present card's table, and where it is read from."""
    folder = os.environ.get(TUNING_DIR_VARIABLE) or os.path.join(Path.home(), ".cache", "lightning_attention", "tuning")
    return Path(folder) / f"{card_slug(card)}.json"


def write_user_table(table: CardTable) -> Path:
    path = user_table_path(table.card)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"card": table.card, "capability": list(table.capability), "sms": table.sms, "entries": table.entries}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    _tables_changed()
    return path


def _read_user_table(card: str) -> CardTable | None:
    path = user_table_path(card)
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.get("card") != card:
        raise ValueError(f"{path} holds a table for {payload.get('card')!r}, not for this card {card!r}")
    return CardTable(card, tuple(payload["capability"]), int(payload["sms"]), payload["entries"], source=str(path))


def _nearest(card: str, capability: tuple[int, int], sms: int) -> CardTable:
    model = card_model(card)
    same_model = [t for t in SHIPPED.values() if model is not None and card_model(t.card) == model]
    if same_model:
        return same_model[0]
    same_capability = [t for t in SHIPPED.values() if t.capability == capability]
    if not same_capability:
        return next(iter(SHIPPED.values()))
    return min(same_capability, key=lambda t: abs(t.sms - sms))


@functools.lru_cache(maxsize=None)
def _tables_for_card(card: str, capability: tuple[int, int], sms: int) -> tuple[CardTable | None, CardTable]:
    """(the user's table for ``card`` or None, the shipped table serving it)."""
    shipped = SHIPPED.get(card)
    if shipped is None:
        shipped = _nearest(card, capability, sms)
        warnings.warn(
            f"lightning_attention has no launch table for {card!r}: using the one measured on {shipped.card!r}. "
            f"`python -m lightning_attention tune` measures this card's own ({user_table_path(card)}).",
            stacklevel=4,
        )
    return _read_user_table(card), shipped


@functools.cache
def _device_facts(index: int) -> tuple[str, tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor), props.multi_processor_count


def _tables(device: torch.device) -> tuple[CardTable | None, CardTable]:
    if device.type != "cuda":
        return None, next(iter(SHIPPED.values()))
    return _tables_for_card(*_device_facts(_index(device)))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def table_for(device: torch.device) -> CardTable:
    """The table in use for ``device``: the user's for its card, else the shipped one, else the nearest shipped one
    (a warning, once per card). On the CPU interpreter: the first shipped table."""
    user, shipped = _tables(device)
    return user if user is not None else shipped


def describe(device: torch.device) -> str:
    """Which table serves ``device``, in words (printed by ``python -m lightning_attention check``)."""
    user, shipped = _tables(device)
    card = _device_facts(_index(device))[0] if device.type == "cuda" else "the CPU interpreter"
    served = f"shipped, measured on {shipped.card}" + ("" if shipped.card == card else f" (serving {card})")
    if user is None:
        return f"{served}; none of this card's own at {user_table_path(card)}" if device.type == "cuda" else served
    return f"this card's own, {user.source}; cases it lacks: {served}"


#: Config functions whose results depend on the tables (:func:`cached`): cleared whenever a table changes.
_CACHED: list = []


def cached(config_function):
    """Cache a kernel module's config function (a few microseconds saved per launch); its results are dropped
    when the tables change (a user table written, a tune candidate in or out)."""
    wrapped = functools.cache(config_function)
    _CACHED.append(wrapped)
    return wrapped


def _tables_changed() -> None:
    _tables_for_card.cache_clear()
    for function in _CACHED:
        function.cache_clear()


#: A table that takes precedence over every other while the tune command measures its candidates (:func:`using`).
_OVERRIDE: CardTable | None = None


@contextlib.contextmanager
def using(table: CardTable):
    """Launch with ``table``'s entries first (the tune command's candidates); other cases as usual."""
    global _OVERRIDE
    saved, _OVERRIDE = _OVERRIDE, table
    _tables_changed()
    try:
        yield table
    finally:
        _OVERRIDE = saved
        _tables_changed()


def find(kernel: str, case: str, device: torch.device) -> dict | None:
    """Field values for ``kernel``'s ``case`` on ``device``'s card: from the tune command's candidate, the user's
    table, the shipped table serving the card, or the complete first table, first that has the case; None when
    none has it (a case that only some cards measure)."""
    if _OVERRIDE is not None and (entry := _OVERRIDE.get(kernel, case)) is not None:
        return entry
    user, shipped = _tables(device)
    if user is not None and (entry := user.get(kernel, case)) is not None:
        return entry
    return shipped.get(kernel, case) or _complete_table().get(kernel, case)


def lookup(kernel: str, case: str, device: torch.device) -> dict:
    """:func:`find` for a case that the complete table holds."""
    entry = find(kernel, case, device)
    if entry is None:
        raise KeyError(f"no launch table has a {kernel!r} entry for case {case!r}")
    return entry


def _complete_table() -> CardTable:
    """The table that holds every case (the first shipped one): it fills the cases another card's table lacks."""
    return next(iter(SHIPPED.values()))


#: Tables measured on each card, the first complete (every case); another card's table holds the cases measured on
#: it, the rest come from the first. Each entry's measurements: benchmarks/results/<card>/ (kernel_choices.md,
#: serving.md, recurrent.md, tuning.md).
SHIPPED: dict[str, CardTable] = {
    table.card: table
    for table in (
        CardTable(
            card="NVIDIA H100 80GB HBM3",
            capability=(9, 0),
            sms=132,
            entries={
                # chunk_scan.scan_case: 16-bit inputs; their gated scans; two K halves (K > 128); fp32 inputs;
                # fp32 heads above 64 under one-pass TF32 (operands rounded in registers: two warpgroups).
                "scan": {
                    "16bit": dict(block_v=64, num_warps=4, num_stages=3, tma_stages=4, tma_warps=4),
                    "16bit-gated": dict(block_v=64, num_warps=8, num_stages=3, tma_stages=4, tma_warps=4),
                    "16bit-k256": dict(block_v=64, num_warps=8, num_stages=2, tma_stages=2, tma_warps=4),
                    "fp32": dict(block_v=64, num_warps=8, num_stages=1, tma_stages=2, tma_warps=4),
                    "fp32-tf32-k128": dict(block_v=64, num_warps=8, num_stages=1, tma_stages=2, tma_warps=8),
                },
                "dkdv": {"16bit": dict(num_warps=4, num_stages=3), "fp32": dict(num_warps=8, num_stages=1)},
                "decode": {
                    "float32": dict(block_v=128, block_k=64, num_warps=8),
                    "bfloat16": dict(block_v=128, block_k=128, num_warps=4),
                },
                "recurrent": {"any": dict(state_tile=4096, num_warps=4)},
            },
        ),
        CardTable(
            card="NVIDIA H200",
            capability=(9, 0),
            sms=132,
            entries={
                # benchmarks/results/h200/serving.md, the decode tile sweeps. fp32, one token: 1.33-1.35x faster than
                # the H100's (128, 64, 8) at N = 64 and 256; several tokens (L = 2..8): 1.09-1.26x faster than the
                # one-token tiles. bf16, one token: one warp walking K in blocks of 32, 1.06-1.07x faster than the
                # best four-warp tile; several tokens: that tile is 1.5-2x slower than (64, 128, 4), kept for both.
                "decode": {
                    "float32": dict(block_v=128, block_k=128, num_warps=4),
                    "float32-multi": dict(block_v=64, block_k=128, num_warps=4),
                    "bfloat16": dict(block_v=128, block_k=32, num_warps=1),
                    "bfloat16-multi": dict(block_v=64, block_k=128, num_warps=4),
                },
            },
        ),
    )
}
