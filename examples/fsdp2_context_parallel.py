"""Train a small Lightning Attention LM with FSDP2 on a 2-D device mesh: data parallel x context parallel.

    torchrun --standalone --nproc_per_node=4 examples/fsdp2_context_parallel.py --cp 2           # dp = 4 / 2
    torchrun --standalone --nproc_per_node=2 examples/fsdp2_context_parallel.py --cp 2 --check   # vs one process

GPUs with NCCL when CUDA is available (one process per GPU), else CPU with gloo.

The mesh is ``init_device_mesh(device, (dp, cp), mesh_dim_names=("dp", "cp"))``. Each data-parallel group takes
its own rows of the batch; the ``cp`` ranks of a group split each row's tokens, rank c holding the c-th
consecutive slice. A row is many documents packed along T (``cu_seqlens`` of the whole row, passed unchanged
on every rank), and documents cross slice boundaries freely. Only the attention layers talk across the cp
ranks: their ``context_parallel_group`` is the mesh's "cp" group; embeddings, norms, MLPs and the loss act on
each token alone. Nothing encodes positions other than the attention's decay, so a slice needs no offset.

Parameters are sharded with ``fully_shard`` on the 2-D mesh (HSDP: sharded across the cp ranks, replicated
across dp groups). Gradients must be reduced over *both* dimensions: a cp rank's gradient covers only its own
tokens' losses. FSDP2 averages over all dp * cp ranks, so each rank's loss is its tokens' summed cross-entropy
times dp * cp / (tokens of the whole batch): the average is then the gradient of the batch's mean loss.
``--shard all`` shards over all ranks instead (a 1-D mesh of the world for FSDP, the 2-D mesh for the cp
groups): less memory per rank, the same gradients.

``--check`` trains the same model on one process (the whole batch, no mesh) in float64 and in ``--dtype``, and
requires the distributed run's first-step gradients (reduction and its scale: AdamW would hide a wrong scale),
losses and final parameters to match float64 at least as well as (2x + 1e-6) the single process in the same
dtype does: the library's tolerance rule. Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_attention.models import LightningLM, LMConfig
from lightning_attention.nn import LightningAttention
from lightning_attention.testing import rel_err

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks per data-parallel group")
    parser.add_argument("--shard", choices=["cp", "all"], default="cp", help="FSDP over the cp ranks (HSDP) or all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per row (one row per dp group)")
    parser.add_argument("--doc-lengths", type=int, nargs=2, default=(1, 40), metavar=("MIN", "MAX"))
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--check", action="store_true", help="compare with single-process training")
    return parser.parse_args(argv)


def make_batch(rows: int, tokens: int, doc_lengths, vocab: int):
    """Token ids ``[rows, tokens + 1]`` and per row the documents' offsets: ``cu_seqlens`` of the row's first
    ``tokens`` positions (the inputs) and, for the labels, -100 where a document ends (no next token)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, tokens + 1), generator=gen)
    cu, labels = [], ids[:, 1:].clone()
    for row in range(rows):
        bounds = [0]
        while bounds[-1] < tokens:
            n = int(torch.randint(doc_lengths[0], doc_lengths[1] + 1, (1,), generator=gen))
            bounds.append(min(tokens, bounds[-1] + n))
        labels[row, [b - 1 for b in bounds[1:]]] = -100  # a document's last token predicts nothing
        cu.append(torch.tensor(bounds, dtype=torch.int32))
    return ids[:, :-1], labels, cu


def build_model(args, dtype) -> LightningLM:
    torch.manual_seed(0)  # the same initial weights on every rank and in the single-process reference
    config = LMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, chunk_size=16
    )
    return LightningLM(config).to(dtype)


def token_losses(model, ids, labels, cu_seqlens, device) -> torch.Tensor:
    """Summed cross-entropy over one row ``[1, T]`` of packed documents."""
    logits = model(ids[None].to(device), cu_seqlens=cu_seqlens.to(device))[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.to(device), ignore_index=-100, reduction="sum")


def train_single_process(args, dtype, batch, steps):
    """The reference: the whole batch on one process, rows packed into one (documents never cross rows)."""
    ids, labels, cu = batch
    offsets = torch.arange(ids.shape[0]) * ids.shape[1]
    row_cu = torch.cat([cu[0][:1]] + [c[1:] + o for c, o in zip(cu, offsets)])
    model = build_model(args, dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    total = int((labels != -100).sum())
    losses, first_grads = [], None
    for _ in range(steps):
        loss = token_losses(model, ids.reshape(-1), labels.reshape(-1), row_cu, "cpu") / total
        loss.backward()
        first_grads = first_grads or {name: p.grad.clone() for name, p in model.named_parameters()}
        optim.step()
        optim.zero_grad()
        losses.append(loss.detach().double())
    return first_grads, torch.stack(losses), model.state_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} must divide the number of processes {world}")
    dp = world // args.cp
    mesh = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")

    model = build_model(args, dtype).to(device)
    for module in model.modules():
        if isinstance(module, LightningAttention):
            module.context_parallel_group = mesh.get_group("cp")
    shard_mesh = mesh if args.shard == "cp" else init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # This rank's part of the batch: its dp group's row, its cp slice of the row's tokens.
    batch = make_batch(dp, args.tokens, args.doc_lengths, args.vocab)
    ids, labels, cu = batch
    start, end = args.tokens * cp_rank // args.cp, args.tokens * (cp_rank + 1) // args.cp
    total = int((labels != -100).sum())
    losses, first_grads = [], None
    for step in range(args.steps):
        loss_sum = token_losses(model, ids[dp_rank, start:end], labels[dp_rank, start:end], cu[dp_rank], device)
        (loss_sum * world / total).backward()
        if args.check and step == 0:  # gathering a sharded gradient is a collective
            first_grads = {name: p.grad.full_tensor().cpu() for name, p in model.named_parameters()}
        optim.step()
        optim.zero_grad()
        batch_loss = loss_sum.detach().double().reshape(1)
        dist.all_reduce(batch_loss)
        losses.append(batch_loss / total)
        if dist.get_rank() == 0:
            print(f"step {step}: loss {losses[-1].item():.6f}", flush=True)

    ok = True
    if args.check:
        full = {name: p.full_tensor().cpu() for name, p in model.state_dict().items()}  # a collective
        if dist.get_rank() == 0:
            ok = compare(args, dtype, batch, (first_grads, torch.cat(losses).cpu(), full))
        verdict = torch.tensor([int(ok)], device=device)
        dist.broadcast(verdict, src=0)
        ok = bool(verdict.item())
    dist.destroy_process_group()
    return 0 if ok else 1


def compare(args, dtype, batch, distributed) -> bool:
    """``distributed``: (first step's gradients, every step's loss, final parameters) of the distributed run."""
    exact = train_single_process(args, torch.float64, batch, args.steps)
    same = train_single_process(args, dtype, batch, args.steps)
    rows = [("loss per step", distributed[1], exact[1], same[1])]
    for kind, i in (("gradient (step 0)", 0), ("parameter (last step)", 2)):
        rows += [(f"{kind} {name}", distributed[i][name], exact[i][name], same[i][name]) for name in exact[i]]
    ok = True
    for name, got, exact, same in rows:
        err, base = rel_err(got, exact), rel_err(same, exact)
        good = err <= 2 * base + 1e-6
        ok &= good
        print(f"{'ok ' if good else 'BAD'} {name}: distributed vs float64 {err:.2e}, single process {base:.2e}")
    print("MATCHES single-process training" if ok else "DOES NOT MATCH single-process training", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
