"""GPU correctness of the chunked Triton engine at real shapes (run on the device; output kept in results/).

For each case: forward (o, final_state) and every gradient (dq, dk, dv, dh0, with dht) of
``chunk_simple_gla(backend="triton")`` against the torch engine in float64 on the GPU (the exact chunked
form; tests/engines/cpu check it against the token-loop reference). Pass rule (lightning_attention.testing):
relative error <= 2 x that of plain torch running the same algorithm in the input dtype, + 1e-5.
Prints one line per case and tensor, then PASS/FAIL; exits 1 on any failure.

    python benchmarks/check_chunk.py
"""

from __future__ import annotations

import sys

import torch

from lightning_attention import chunk_lightning_attn, chunk_simple_gla, decay
from lightning_attention.engines.cpu import _common as torch_engine_common
from lightning_attention.testing import make_inputs, rel_err

NAMES = ("o", "final", "dq", "dk", "dv", "dh0")


def _mixed_lengths(num: int, longest: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, longest, (num,), generator=gen)
    lengths[:: max(1, num // 8)] = 0  # some empty sequences
    lengths[1] = longest  # one long one
    return [0] + torch.cumsum(lengths, 0).tolist()


def _forward_backward(q, k, v, h0, g, cu, reverse, backend):
    q, k, v, h0 = (t.detach().requires_grad_() for t in (q, k, v, h0))
    o, final = chunk_simple_gla(
        q, k, v, g_gamma=g, initial_state=h0, output_final_state=True, cu_seqlens=cu, reverse=reverse, backend=backend
    )
    gen = torch.Generator(device=q.device).manual_seed(1)
    do = torch.randn(o.shape, device=q.device, generator=gen).to(o.dtype)
    dht = torch.randn(final.shape, device=q.device, generator=gen).to(final.dtype)
    grads = torch.autograd.grad((o, final), (q, k, v, h0), (do, dht))
    return [t.detach() for t in (o, final, *grads)]


def check(name, B, T, H, K, V, dtype, reverse=False, cu=None, fp32_precision="highest") -> bool:
    """Ours and the torch engine in ``dtype`` against the torch engine in float64. ``fp32_precision``: torch's
    float32 matmul precision for ours and the fp32 baseline ("high": one TF32 product per dot in both)."""
    num_seqs = None if cu is None else len(cu) - 1
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype=dtype, device="cuda", initial_state=True, num_seqs=num_seqs)
    h0 = h0.float()
    g = decay.g_gamma(H, 2, 8, device="cuda")
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    orig_precision, orig_dtype = torch.get_float32_matmul_precision(), torch_engine_common.compute_dtype
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        got = _forward_backward(q, k, v, h0, g, cu_t, reverse, "triton")
        torch_engine_common.compute_dtype = lambda *tensors: dtype
        base = _forward_backward(q, k, v, h0, g, cu_t, reverse, "torch")
    finally:
        torch_engine_common.compute_dtype = orig_dtype
        torch.set_float32_matmul_precision(orig_precision)
    ref = _forward_backward(q.double(), k.double(), v.double(), h0.double(), g, cu_t, reverse, "torch")
    ok = True
    for tname, a, b, r in zip(NAMES, got, base, ref):
        err, berr = rel_err(a, r), rel_err(b, r)
        good = err <= 2 * berr + 1e-5
        ok &= good
        verdict = "ok" if good else "FAIL"
        print(f"{name:34s} {tname:6s} err {err:.2e}  torch-{str(dtype)[6:]} {berr:.2e}  {verdict}", flush=True)
    del got, base, ref
    torch.cuda.empty_cache()
    return ok


def strong_decay_partial_chunk() -> bool:
    """T=100, H=4, layer 2 of 8: lam^64 of the last head underflows; the final state must be finite and exact."""
    q, k, v, h0 = make_inputs(1, 100, 4, 64, dtype=torch.bfloat16, device="cuda", initial_state=True)
    _, final = chunk_lightning_attn(q, k, v, 2, 8, initial_state=h0, output_final_state=True, backend="triton")
    _, ref = chunk_lightning_attn(
        *(t.double() for t in (q, k, v)), 2, 8, initial_state=h0.double(), output_final_state=True, backend="torch"
    )
    err = rel_err(final, ref)
    print(f"{'tnl T=100 H=4 layer 2/8 final':34s} finite {bool(torch.isfinite(final).all())} err {err:.2e}")
    return bool(torch.isfinite(final).all()) and err < 1e-2


def no_decay_million_tokens() -> bool:
    """Head 0 of "tnl" has g = 0: over 2^20 tokens in bf16 the state grows but stays finite and accurate."""
    T = 1 << 20
    q, k, v, _ = make_inputs(1, T, 2, 128, dtype=torch.bfloat16, device="cuda")
    o, final = chunk_lightning_attn(q, k, v, 0, 8, output_final_state=True, backend="triton")
    ref = torch.einsum("tk,tv->kv", k[0, :, 0].double(), v[0, :, 0].double())
    err = rel_err(final[0, 0], ref)
    finite = bool(torch.isfinite(o).all() and torch.isfinite(final).all())
    print(f"{'tnl head 0 (g=0), 2^20 tokens bf16':34s} finite {finite} final err {err:.2e}")
    return finite and err < 1e-3


def main() -> int:
    ok = True
    ok &= check("2x65536x4 K128 V128 bf16", 2, 65536, 4, 128, 128, torch.bfloat16)
    ok &= check("1x65536x4 K64 V96 fp16 reverse", 1, 65536, 4, 64, 96, torch.float16, reverse=True)
    cu = _mixed_lengths(150, 4000)  # (~300k tokens: the float64 baseline's backward must fit the card)
    ok &= check(f"varlen {len(cu) - 1} seqs T={cu[-1]} bf16", 1, cu[-1], 8, 128, 128, torch.bfloat16, cu=cu)
    cu = _mixed_lengths(100, 3000, seed=1)  # (the fp64 baseline of the case above in fp32 ran out of memory)
    ok &= check(f"varlen {len(cu) - 1} seqs T={cu[-1]} reverse fp32", 1, cu[-1], 4, 128, 64, torch.float32, True, cu)
    ok &= check("1x32768x8 K128 V128 bf16 (split)", 1, 32768, 8, 128, 128, torch.bfloat16)
    ok &= check("4x8192x8 K128 V128 fp32", 4, 8192, 8, 128, 128, torch.float32)
    ok &= check("4x8192x8 K128 V128 fp32 TF32", 4, 8192, 8, 128, 128, torch.float32, fp32_precision="high")
    ok &= check("4x8192x8 K64 V64 fp32 TF32", 4, 8192, 8, 64, 64, torch.float32, fp32_precision="high")
    ok &= check("2x8192x4 K256 V256 bf16", 2, 8192, 4, 256, 256, torch.bfloat16)
    ok &= check("2x4100x4 K48 V80 bf16", 2, 4100, 4, 48, 80, torch.bfloat16)
    ok &= check("2x4100x4 K200 V24 bf16 reverse", 2, 4100, 4, 200, 24, torch.bfloat16, reverse=True)
    ok &= strong_decay_partial_chunk()
    ok &= no_decay_million_tokens()
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
