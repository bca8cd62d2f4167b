"""Modules built on the ops: the :class:`LightningAttention` layer and its decode :class:`LightningCache`."""

from lightning_attention.nn.cache import LightningCache
from lightning_attention.nn.layer import ACTIVATIONS, LightningAttention, RMSNorm

__all__ = ["LightningAttention", "LightningCache", "RMSNorm", "ACTIVATIONS"]
