"""Context parallelism at the op level: one row of packed documents split along T over the ranks.

    torchrun --standalone --nproc_per_node=4 examples/context_parallel.py            # GPUs (NCCL) or CPU (gloo)

Every rank builds the same full row (only to check the result here), keeps its consecutive slice of the tokens,
and calls the op with the whole row's ``cu_seqlens``: documents cross the slice boundaries freely. Each rank's
output and gradients are its slice of the single-device op's; the final state of every document is returned on
every rank. Prints each rank's error against the single-device op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lightning_attention import chunk_lightning_attn
from lightning_attention.distributed import context_parallel_lightning_attn

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = "cuda" if cuda else "cpu"
T, H, D = (262144, 32, 128) if cuda else (2048, 4, 32)

# The full row, identical on every rank: documents of 1 to T/3 tokens packed along T.
gen = torch.Generator(device=device).manual_seed(0)
q, k, v = (torch.randn(1, T, H, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(3))
cuts = torch.randint(1, T, (6,), generator=gen, device=device).sort().values
cu_seqlens = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), T)]).to(torch.int32)

mine = slice(rank * T // world, (rank + 1) * T // world)  # any split works, even empty slices
q_r, k_r, v_r = (x[:, mine].clone().requires_grad_() for x in (q, k, v))
o_r, final = context_parallel_lightning_attn(
    q_r, k_r, v_r, layer_idx=2, num_layers=8, output_final_state=True, cu_seqlens=cu_seqlens
)
o_r.float().square().mean().backward()  # gradients flow across ranks: q_r.grad is exact for this slice

o, final_ref = chunk_lightning_attn(q, k, v, 2, 8, output_final_state=True, cu_seqlens=cu_seqlens)
err = (o_r.float() - o[:, mine].float()).norm() / o[:, mine].float().norm()
final_err = (final - final_ref).norm() / final_ref.norm()
print(
    f"rank {rank}: tokens {mine.start}..{mine.stop} of {T} ({cu_seqlens.numel() - 1} documents); relative "
    f"difference to one device: output {err:.1e}, final states {final_err:.1e}\n",
    end="",
    flush=True,
)  # one write per line: the ranks share the terminal
dist.destroy_process_group()
