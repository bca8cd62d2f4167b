"""Multi-GPU Lightning Attention: context parallelism (one sequence split along T over a process group).

See :mod:`lightning_attention.distributed.context_parallel` for the algorithm and the gradient rules of the
replicated initial/final states.
"""

from lightning_attention.distributed.context_parallel import (
    context_parallel_lightning_attn,
    context_parallel_simple_gla,
)

__all__ = ["context_parallel_simple_gla", "context_parallel_lightning_attn"]
