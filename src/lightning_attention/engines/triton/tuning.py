"""Launch configurations per card: the tables measured on each card, a user's own, and the lookup.

Each Triton kernel has a small configuration (tiles, warps, pipeline stages, ...) per *case* (a dtype and head-size
class). The values depend on the card, so they live in one table per card:

* shipped tables (:data:`SHIPPED`), measured with ``python -m lightning_attention tune`` on the cards named there
  (the measurements: benchmarks/results/<card>/tuning.md);
* a user's own table for the present card, written by the same command to :func:`user_table_path` and used in
  preference to the shipped one (``python -m lightning_attention check`` prints which table is in use).

Nothing is tuned implicitly at run time. A card with no table of its own uses the shipped table of the nearest card
(same compute capability, then the closest multiprocessor count; else the first table) and says so once.

A table maps ``kernel -> case -> {field: value}``; the kernel modules turn the fields into their config dataclasses
and own the meaning of each case (e.g. ``chunk_scan.scan_case``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["CardTable", "SHIPPED", "table_for", "lookup", "user_table_path", "card_slug", "write_user_table"]

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
    _table_for_card.cache_clear()
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
    same = [t for t in SHIPPED.values() if t.capability == capability]
    pool = same or list(SHIPPED.values())
    return min(pool, key=lambda t: abs(t.sms - sms))


@functools.lru_cache(maxsize=None)
def _table_for_card(card: str, capability: tuple[int, int], sms: int) -> CardTable:
    user = _read_user_table(card)
    if user is not None:
        return user
    if card in SHIPPED:
        return SHIPPED[card]
    nearest = _nearest(card, capability, sms)
    warnings.warn(
        f"lightning_attention has no launch table for {card!r}: using the one measured on {nearest.card!r}. "
        f"`python -m lightning_attention tune` measures this card's own ({user_table_path(card)}).",
        stacklevel=3,
    )
    return nearest


@functools.cache
def _device_facts(index: int) -> tuple[str, tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor), props.multi_processor_count


def table_for(device: torch.device) -> CardTable:
    """The table in use for ``device``: the user's for its card, else the shipped one, else the nearest shipped one
    (a warning, once per card). On the CPU interpreter: the first shipped table."""
    if device.type != "cuda":
        return next(iter(SHIPPED.values()))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _table_for_card(*_device_facts(index))


def lookup(kernel: str, case: str, device: torch.device) -> dict | None:
    """Field values for ``kernel``'s ``case`` on ``device``'s card, or None where its table has no entry (then
    the kernel's own default applies)."""
    return table_for(device).get(kernel, case)


#: Tables measured on each card (benchmarks/results/<card>/tuning.md). Filled by the kernel modules' entries below.
SHIPPED: dict[str, CardTable] = {}
