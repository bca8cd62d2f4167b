"""Input validation shared by every public op: errors name the argument and show the shapes.

Everything here runs before any kernel. Values are checked without a device sync per call: ``cu_seqlens`` here
when it is a CPU tensor (or its host copy ``cu_seqlens_cpu`` is given), else where an engine reads it on the host
anyway (:func:`cu_seqlens_bounds`; kernels that read it on the device clamp their rows to the tensors);
``g_gamma`` once per tensor and version. Per-token gates ``g`` are checked for shape, dtype and device only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes of the serving state cache (accumulation is float32 either way).
CACHE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class ScanConfig:
    """What a scan does, passed down to the engines instead of a row of flags.

    scale: multiplies q S.  reverse: scan t = T..1.  chunk_size: tokens per chunk for chunked engines.
    output_final_state: whether the caller wants S_T back.
    """

    scale: float
    reverse: bool = False
    chunk_size: int = 64
    output_final_state: bool = False


def shape_str(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {shape_str(t)}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [B, T, H, D] (layout is batch, time, heads, head dim), got {shape_str(t)}"
            )
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K]: q {shape_str(q)}, k {shape_str(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H: q {shape_str(q)}, v {shape_str(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype: q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device: q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims K and V must be >= 1: q {shape_str(q)}, v {shape_str(v)}")


#: g_gamma tensors whose values have been checked, with their version (torch's in-place update counter) at the
#: time: a GPU tensor is read back once per content, not once per call, and decay.g_gamma marks its own results.
_CHECKED_G_GAMMA = WeakIdKeyDictionary()


def mark_g_gamma_checked(g_gamma: torch.Tensor) -> torch.Tensor:
    """Record that ``g_gamma``'s current values are valid (finite, <= 0), so no op reads them back. Returns it."""
    if not isinstance(g_gamma, FakeTensor) and not torch.compiler.is_compiling():
        _CHECKED_G_GAMMA[g_gamma] = g_gamma._version
    return g_gamma


def _g_gamma_needs_check(g_gamma: torch.Tensor) -> bool:
    """Unchecked values that can be read now: never under torch.compile or CUDA-graph capture (a read would
    break the graph or fail), and a GPU tensor only once per version (one device sync)."""
    if isinstance(g_gamma, FakeTensor) or g_gamma.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if _CHECKED_G_GAMMA.get(g_gamma) == g_gamma._version:
        return False
    return not (g_gamma.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_g_gamma(g_gamma: torch.Tensor | None, num_heads: int, device: torch.device) -> torch.Tensor:
    """Returns g_gamma as float32 [H] on ``device`` (zeros, i.e. no constant decay, for None). Its values are
    checked once per tensor and version."""
    if g_gamma is None:
        return torch.zeros(num_heads, dtype=torch.float32, device=device)
    if not isinstance(g_gamma, torch.Tensor):
        raise TypeError(f"g_gamma must be a torch.Tensor of shape [H={num_heads}], got {type(g_gamma).__name__}")
    if g_gamma.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"g_gamma must be a floating tensor, got {shape_str(g_gamma)}")
    if g_gamma.shape != (num_heads,):
        raise ValueError(f"g_gamma must have shape [H={num_heads}], got {shape_str(g_gamma)}")
    if _g_gamma_needs_check(g_gamma):
        values = g_gamma.detach().tolist()
        if not all(math.isfinite(x) and x <= 0 for x in values):
            raise ValueError(f"g_gamma must be finite and <= 0 (decay exp(g) <= 1), got {values}")
        mark_g_gamma_checked(g_gamma)
    return g_gamma.detach().to(device=device, dtype=torch.float32)


def values_readable(t: torch.Tensor) -> bool:
    """Values can be checked without a device sync or a trace break: a real CPU tensor, eager mode."""
    return t.device.type == "cpu" and not isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def cu_seqlens_bounds(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[int, ...]:
    """The values of ``cu_seqlens`` as host ints, checked: 0-based, non-decreasing, last == ``num_tokens``.

    Every place that reads ``cu_seqlens`` on the host goes through here (for a CUDA tensor this read is the one
    device sync the caller already pays for), so a bad value is a ValueError before any kernel runs: a kernel
    walking rows from a bad offset would read and write outside its tensors.
    """
    bounds = tuple(int(b) for b in cu_seqlens.tolist())
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {list(bounds[:8])}")
    drops = [i for i in range(1, len(bounds)) if bounds[i] < bounds[i - 1]]
    if drops:
        i = drops[0]
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i - 1}]={bounds[i - 1]} > cu_seqlens[{i}]={bounds[i]}"
        )
    if bounds[-1] != num_tokens:
        raise ValueError(f"cu_seqlens[-1] must equal T={num_tokens} (the packed tokens), got {bounds[-1]}")
    return bounds


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> int:
    """Returns the number of independent sequences N (B without cu_seqlens). The values are checked here when
    that needs no device sync (a CPU tensor in eager mode); elsewhere wherever an engine reads them on the host
    (:func:`cu_seqlens_bounds`)."""
    if cu_seqlens is None:
        return q.shape[0]
    num_seqs = check_cu_seqlens_layout(cu_seqlens, q)
    if values_readable(cu_seqlens):
        cu_seqlens_bounds(cu_seqlens, q.shape[1])
    return num_seqs


def check_cu_seqlens_layout(cu_seqlens: torch.Tensor, q: torch.Tensor) -> int:
    """Type, shape and device of ``cu_seqlens`` (not its values: context parallelism checks those against the
    token count of all shards). Returns the number of sequences N."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got q {shape_str(q)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {shape_str(cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1, got {shape_str(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {shape_str(cu_seqlens)}")
    return cu_seqlens.numel() - 1


def state_dtype(q: torch.Tensor) -> torch.dtype:
    """States are float32, or float64 for float64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_initial_state(
    initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor, num_seqs: int, state_v_first: bool = False
) -> None:
    """``[N, H, K, V]``, or ``[N, H, V, K]`` with ``state_v_first`` (fla's layouts), any floating dtype: the ops
    compute in :func:`state_dtype` (fp16/bf16 states are widened as fla does)."""
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    expected, layout = ((num_seqs, H, V, K), "[N, H, V, K] (state_v_first=True)") if state_v_first else (
        (num_seqs, H, K, V), "[N, H, K, V]")
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must have shape {layout} = {list(expected)} (N = number of sequences), "
            f"got {shape_str(initial_state)}"
        )
    if initial_state.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"initial_state must be a floating tensor, got {shape_str(initial_state)}")
    if initial_state.device != q.device:
        raise ValueError(f"initial_state must be on q's device {q.device}, got {shape_str(initial_state)}")


def check_g(g: torch.Tensor | None, q: torch.Tensor) -> None:
    """Per-token log gates ``[B, T, H]`` (``[1, T, H]`` for packed sequences), any floating dtype, on q's device.

    Values are not checked: every finite value is computed exactly as the definition says (positive gates grow the
    state, and may overflow exactly as the recurrence itself would). A 1-D tensor is a per-head ``g_gamma`` passed
    in ``g``'s place (fla's order is ``q, k, v, g, g_gamma``): that is an error, never reinterpreted."""
    if g is None:
        return
    B, T, H, _ = q.shape
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor [B, T, H] or None, got {type(g).__name__}")
    if g.dim() == 1:
        raise ValueError(
            f"g must be per-token log gates [B, T, H] = {[B, T, H]}, got {shape_str(g)}: a constant per-head "
            "log-decay [H] is g_gamma, the 5th parameter in fla's order (q, k, v, g, g_gamma, ...): pass g_gamma=..."
        )
    if g.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"g must be a floating tensor, got {shape_str(g)}")
    if tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must have shape [B, T, H] = {[B, T, H]} (q's first three dims), got {shape_str(g)}")
    if g.device != q.device:
        raise ValueError(f"g must be on q's device {q.device}, got {shape_str(g)}")


def check_cu_seqlens_cpu(cu_seqlens_cpu: torch.Tensor | None, cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> None:
    """A host copy of ``cu_seqlens`` (fla's ``cu_seqlens_cpu``): the engines plan from it instead of reading the
    device tensor. Its shape is checked against ``cu_seqlens`` and its values as :func:`cu_seqlens_bounds` checks
    them; that it holds the same values as the device tensor is checked only when ``cu_seqlens`` is readable
    without a sync (a CPU tensor), since comparing them would be the very read it spares."""
    if cu_seqlens_cpu is None:
        return
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_cpu is a host copy of cu_seqlens: pass cu_seqlens too")
    if not isinstance(cu_seqlens_cpu, torch.Tensor):
        raise TypeError(f"cu_seqlens_cpu must be a torch.Tensor, got {type(cu_seqlens_cpu).__name__}")
    if cu_seqlens_cpu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens_cpu must be int32 or int64, got {shape_str(cu_seqlens_cpu)}")
    if cu_seqlens_cpu.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_cpu must have cu_seqlens' shape: cu_seqlens {shape_str(cu_seqlens)}, "
            f"cu_seqlens_cpu {shape_str(cu_seqlens_cpu)}"
        )
    if cu_seqlens_cpu.device.type != "cpu":
        raise ValueError(f"cu_seqlens_cpu must be a CPU tensor, got {shape_str(cu_seqlens_cpu)}")
    if values_readable(cu_seqlens_cpu):
        bounds = cu_seqlens_bounds(cu_seqlens_cpu, q.shape[1])
        if values_readable(cu_seqlens) and bounds != tuple(int(b) for b in cu_seqlens.tolist()):
            raise ValueError(f"cu_seqlens_cpu must hold cu_seqlens' values, got {list(bounds[:8])} and "
                             f"{cu_seqlens.tolist()[:8]}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def check_no_extra_kwargs(op: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{op}() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")


def check_scan_inputs(
    q, k, v, g_gamma, scale, initial_state, cu_seqlens, chunk_size, *, g=None, state_v_first=False, cu_seqlens_cpu=None
):
    """Every check of a scan op's arguments, in order. Returns ``(g_gamma float32 [H], scale, chunk_size)``."""
    check_qkv(q, k, v)
    num_seqs = check_cu_seqlens(cu_seqlens, q)
    check_cu_seqlens_cpu(cu_seqlens_cpu, cu_seqlens, q)
    check_initial_state(initial_state, q, v, num_seqs, state_v_first)
    check_g(g, q)
    g_gamma = check_g_gamma(g_gamma, q.shape[2], q.device)
    return g_gamma, check_scale(scale, q.shape[-1]), check_chunk_size(chunk_size)


def check_state_cache(state_cache, q: torch.Tensor, v: torch.Tensor) -> int:
    """A slot-indexed state cache [num_slots, H, K, V] for q [..., H, K], v [..., V]. Returns num_slots."""
    if not isinstance(state_cache, torch.Tensor):
        raise TypeError(f"state_cache must be a torch.Tensor, got {type(state_cache).__name__}")
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    if state_cache.dim() != 4 or tuple(state_cache.shape[1:]) != (H, K, V):
        raise ValueError(f"state_cache must be [num_slots, H={H}, K={K}, V={V}], got {shape_str(state_cache)}")
    if state_cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"state_cache must be float32 or bfloat16, got {shape_str(state_cache)}")
    if state_cache.device != q.device:
        raise ValueError(f"state_cache must be on q's device {q.device}, got {shape_str(state_cache)}")
    if not state_cache.is_contiguous():
        raise ValueError(
            f"state_cache must be contiguous (it is updated in place, a copy would lose the update), "
            f"got strides {state_cache.stride()}"
        )
    return state_cache.shape[0]
