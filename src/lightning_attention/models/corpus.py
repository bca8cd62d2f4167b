"""The demo's corpus: the text of ``pydoc_data.topics`` (Python's own help pages, ~460K characters, shipped with
Python: no download), as bytes. Byte-level tokens: ids 0..255, vocabulary 256.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pydoc_topics_text", "encode", "decode", "split_holdout", "random_windows", "unigram_loss"]


def pydoc_topics_text() -> str:
    """Every topic of ``pydoc_data.topics``, in sorted topic order, separated by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data from their Python
        raise RuntimeError("the demo corpus needs the standard library's pydoc_data package") from exc
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 ids ``[L]``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Ids back to text (invalid UTF-8, e.g. a multi-byte character cut in half, becomes U+FFFD)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(values).decode("utf-8", errors="replace")


def split_holdout(tokens: torch.Tensor, holdout_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: the last ``holdout_fraction`` of the corpus is held out, as one contiguous piece, so
    no held-out window overlaps a training window."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    cut = int(len(tokens) * (1 - holdout_fraction))
    return tokens[:cut], tokens[cut:]


def random_windows(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs ``[B, seq_len]`` and next-token targets ``[B, seq_len]``."""
    if len(tokens) <= seq_len:
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len={seq_len}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def unigram_loss(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int = 256) -> float:
    """Cross-entropy (nats per token) of ``held_out`` under the byte frequencies of ``train`` (add-one smoothed):
    the loss of the best model that ignores context, the bar a trained LM must clear."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    loss = -log_probs[held_out].mean().item()
    return loss if math.isfinite(loss) else float("inf")
