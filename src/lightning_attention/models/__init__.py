"""Small models built from :class:`lightning_attention.nn.LightningAttention` (used by ``python -m lightning_attention
demo``), and the demo's byte-level corpus (:mod:`lightning_attention.models.corpus`)."""

from lightning_attention.models.lm import GenerateOutput, LightningLM, LMConfig

__all__ = ["LightningLM", "LMConfig", "GenerateOutput"]
