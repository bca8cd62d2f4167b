"""Adapters that run other libraries' models on lightning-attention's kernels.

- :mod:`lightning_attention.integrations.transformers`: :func:`use_lightning_attention` for transformers'
  MiniMax models (imported on use: transformers is an optional dependency, ``pip install lightning-attention[hf]``).
"""
