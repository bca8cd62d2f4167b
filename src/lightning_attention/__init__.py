"""lightning-attention: fast, exact Lightning Attention (linear attention with a per-head scalar decay).

Per sequence and head, with ``lam = exp(g_gamma[h])``::

    S_t = lam * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

Ops (layout q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, state ``[N, H, K, V]`` float32; return ``(o, final_state)``):

- :func:`chunk_lightning_attn`, :func:`fused_recurrent_lightning_attn`: fla's signatures, decay from
  ``(layer_idx, num_layers)`` through :func:`lightning_attention.decay.g_gamma`.
- :func:`chunk_simple_gla`, :func:`fused_recurrent_simple_gla`: fla's Simple GLA, per-token gates ``g [B, T, H]``
  and/or any per-head ``g_gamma [H]``.
- :mod:`lightning_attention.reference`: the exact (float64-capable) references.

Beyond the ops: :mod:`lightning_attention.nn` (the MiniMax / TransNormerLLM token-mixing layer and its decode
cache), :mod:`lightning_attention.serving` (decode step and prefill on a slot-indexed state cache),
:mod:`lightning_attention.distributed` (context parallelism over a process group),
:mod:`lightning_attention.integrations.transformers` (run transformers' MiniMax on these kernels), and
``python -m lightning_attention {demo,check,bench}``.
"""

from lightning_attention import decay
from lightning_attention.decay import g_gamma
from lightning_attention.ops import (
    chunk_lightning_attn,
    chunk_simple_gla,
    fused_recurrent_lightning_attn,
    fused_recurrent_simple_gla,
)
from lightning_attention.reference import chunk_reference, recurrent_reference

__version__ = "0.1.0"

__all__ = [
    "chunk_lightning_attn",
    "fused_recurrent_lightning_attn",
    "chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "chunk_reference",
    "recurrent_reference",
    "g_gamma",
    "decay",
    "__version__",
]
