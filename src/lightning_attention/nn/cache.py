"""The decode state cache: one fixed-size recurrent state per Lightning Attention layer.

Lightning Attention summarises a sequence's whole history in ``S [H, K, V]`` per layer, so incremental decoding
keeps one tensor per layer, ``[N, H, K, V]`` float32 (N sequences), whatever the number of tokens seen: there is
no growing key/value cache. The cache is updated in place by the layers (by design); everything else is never
modified.
"""

from __future__ import annotations

import torch

__all__ = ["LightningCache"]


class LightningCache:
    """Per-layer recurrent states for incremental decoding, keyed by ``layer_idx``.

    A layer given a cache reads its state (if any) as the initial state, continues the scan from it, and stores
    the new final state back. ``seen_tokens`` counts the tokens of the longest sequence fed so far; the model
    advances it (a layer cannot know whether it is the last one to see a step).
    """

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.seen_tokens = 0

    def get(self, layer_idx: int) -> torch.Tensor | None:
        """The state ``[N, H, K, V]`` of layer ``layer_idx``, or None before its first step."""
        return self.states.get(layer_idx)

    def update(self, layer_idx: int, state: torch.Tensor) -> None:
        """Store ``state [N, H, K, V]`` as layer ``layer_idx``'s state (replacing the previous one)."""
        if not isinstance(state, torch.Tensor) or state.dim() != 4:
            raise ValueError(f"state must be a [N, H, K, V] tensor, got {getattr(state, 'shape', type(state))}")
        previous = self.states.get(layer_idx)
        if previous is not None and previous.shape[0] != state.shape[0]:
            raise ValueError(
                f"layer {layer_idx}: the cache holds {previous.shape[0]} sequences, the new state {state.shape[0]}"
            )
        self.states[layer_idx] = state

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and reorder) the sequences ``indices`` (int ``[N']``) of every layer, e.g. for beam search."""
        for layer_idx, state in self.states.items():
            self.states[layer_idx] = state.index_select(0, indices.to(state.device))

    def reset(self) -> None:
        """Forget every state (start new sequences)."""
        self.states.clear()
        self.seen_tokens = 0

    @property
    def num_sequences(self) -> int | None:
        """N, or None while the cache is empty."""
        return next(iter(self.states.values())).shape[0] if self.states else None

    @property
    def nbytes(self) -> int:
        """Bytes held by all states: constant in the number of tokens decoded."""
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self.states

    def __repr__(self) -> str:
        return f"LightningCache(layers={sorted(self.states)}, seen_tokens={self.seen_tokens}, nbytes={self.nbytes})"
