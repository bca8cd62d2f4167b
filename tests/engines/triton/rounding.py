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


def interpreter_rounds_bf16_to_nearest(monkeypatch) -> None:
    """Make the CPU interpreter round float32 -> bfloat16 casts to nearest even, as the GPU does.

    A kernel rounds its 16-bit product operands inside (the state, weighted tiles): a baseline cannot round
    those like the interpreter, and truncation biases every such rounding one way, which sums of many rounded
    terms (dg: a running sum over the sequence) turn into errors several times the GPU's. With this, a
    bfloat16 run under the interpreter has the GPU's rounding and is judged against the same baselines."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(values.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
