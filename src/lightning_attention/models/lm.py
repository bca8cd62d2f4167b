"""LightningLM: a small decoder-only language model whose only token mixer is Lightning Attention.

    x = embed(ids)                                                    [B, T, hidden]
    per layer:  x = x + LightningAttention(RMSNorm(x))                (layer_idx sets the decay)
                x = x + W_down (silu(x' W_gate) * x' W_up),  x' = RMSNorm(x)      (SwiGLU MLP)
    logits = RMSNorm(x) @ embed.weight^T                              [B, T, vocab] (tied weights)

No position embedding: the per-head decay already makes the mixer position-aware. Training and prompts run the
chunked op; :meth:`LightningLM.generate` decodes token by token with a :class:`~lightning_attention.nn.LightningCache`
(one ``[B, H, D, D]`` state per layer, whatever the length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_attention.nn import LightningAttention, LightningCache, RMSNorm

__all__ = ["LMConfig", "LightningLM", "GenerateOutput"]


@dataclass(frozen=True)
class LMConfig:
    """Model shape. ``intermediate_size`` defaults to 8/3 * hidden_size rounded up to a multiple of 64."""

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None
    schedule: str = "minimax"
    chunk_size: int = 64
    backend: str = "auto"
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-8 * self.hidden_size // 3 // 64) * 64


class GenerateOutput(NamedTuple):
    """tokens: ``[B, T0 + n]`` prompt then generated ids; logits: ``[B, n, vocab]`` in the model's output dtype,
    the decode-path logits each new token was chosen from (step i's logits predict ``tokens[:, T0 + i]``)."""

    tokens: torch.Tensor
    logits: torch.Tensor


class _Block(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.attn_norm = RMSNorm(h, config.norm_eps)
        self.attn = LightningAttention(
            h, config.num_heads, layer_idx=layer_idx, num_layers=config.num_layers, schedule=config.schedule,
            chunk_size=config.chunk_size, backend=config.backend, norm_eps=config.norm_eps,
        )
        self.mlp_norm = RMSNorm(h, config.norm_eps)
        self.gate_up = nn.Linear(h, 2 * config.mlp_size, bias=False)
        self.down = nn.Linear(config.mlp_size, h, bias=False)

    def forward(self, x, attention_mask, cache, cu_seqlens):
        x = x + self.attn(self.attn_norm(x), attention_mask=attention_mask, cache=cache, cu_seqlens=cu_seqlens)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LightningLM(nn.Module):
    """Decoder-only LM of Lightning Attention layers (see the module docstring)."""

    def __init__(self, config: LMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LMConfig()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Residual branches' last projections shrink with depth so the residual stream starts near unit scale.
                depth = (2 * config.num_layers) ** -0.5 if name.endswith(("out_proj.weight", "down.weight")) else 1.0
                nn.init.normal_(p, std=config.init_std * depth)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LightningCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` int ``[B, T]`` -> logits ``[B, T, vocab]``.

        ``attention_mask`` ``[B, T]`` (nonzero = real token), ``cache`` for incremental decoding (advanced by T),
        ``cu_seqlens`` for sequences packed along T (B == 1): see :meth:`LightningAttention.forward`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask, cache, cu_seqlens)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return F.linear(self.norm(x), self.embed.weight)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> GenerateOutput:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids [B, T0]`` on the decode path: one chunked forward
        over the prompt fills a :class:`LightningCache`, then each step feeds one token and reuses the states.

        ``temperature=0`` is greedy. ``attention_mask [B, T0]`` marks the real prompt tokens (left padding).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cache = LightningCache()
        logits = self(prompt_ids, attention_mask=attention_mask, cache=cache)[:, -1]
        tokens, step_logits = [prompt_ids], []
        for _ in range(max_new_tokens):
            step_logits.append(logits)
            next_ids = _sample(logits.float(), temperature, top_k, generator)
            tokens.append(next_ids)
            logits = self(next_ids, cache=cache)[:, -1]
        empty = logits.new_zeros(prompt_ids.shape[0], 0, self.config.vocab_size)
        return GenerateOutput(torch.cat(tokens, dim=1), torch.stack(step_logits, 1) if step_logits else empty)

    def checkpoint(self, **extra) -> dict:
        """A dict for ``torch.save``: the config, the weights, and ``extra`` entries."""
        return {"config": asdict(self.config), "state_dict": self.state_dict(), **extra}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict | str, map_location="cpu") -> "LightningLM":
        """Rebuild a model from :meth:`checkpoint`'s dict or a file saved with ``torch.save``."""
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
        model = cls(LMConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits ``[B, vocab]`` -> ids ``[B, 1]``."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
