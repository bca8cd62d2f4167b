"""How the Triton kernels round a float32 result to their output dtype, for building same-dtype baselines.

On the GPU a float32 -> bfloat16 store rounds to nearest even, like torch. The CPU interpreter of Triton 3.6
rounds it toward zero instead (its ``cast_impl`` truncates the mantissa), which doubles the rounding error of
every bfloat16 output. A baseline for a kernel run under the interpreter must round the same way, or the
comparison measures the interpreter, not the kernel.
"""

import torch


def round_like_kernel(x: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """float32 ``x`` rounded to ``dtype`` as a kernel on ``device`` ("cuda", or "cpu" = interpreter) stores it."""
    if device == "cpu" and dtype == torch.bfloat16 and x.dtype == torch.float32:
        # Round toward zero: keep sign, exponent and the top 7 mantissa bits (exact in float32).
        return (x.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return x.to(dtype)
