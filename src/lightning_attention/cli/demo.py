"""``python -m lightning_attention demo``: train a small Lightning Attention LM, evaluate it, decode with the cache.

1. Corpus: the text of ``pydoc_data.topics`` (ships with Python), byte-level; the last 10% is held out.
2. Train a decoder-only :class:`~lightning_attention.models.LightningLM` (default 4 layers, hidden 256) for a fixed
   number of steps (default sized to finish in about 2 minutes on 2 CPU cores), with a progress bar.
3. Held-out loss against the unigram baseline (byte frequencies, no context): it must be clearly lower.
4. Generate a sample on the decode path (prompt through the chunked op, then one token at a time from a
   :class:`~lightning_attention.nn.LightningCache`).
5. Check that the decode path's logits equal a full chunked forward over the same tokens: both are measured
   against a float64 copy of the model, and the decode path must be as accurate as the chunked forward.
6. Save a checkpoint and a PNG loss curve.

Exit code 0 when both checks pass. On CUDA the ops run the Triton kernels (backend "auto").
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_attention.engines import resolve_backend
from lightning_attention.models import LightningLM, LMConfig, corpus
from lightning_attention.nn import LightningAttention
from lightning_attention.testing import rel_err

#: By default the held-out loss must be at least this fraction below the unigram baseline ("clearly better").
#: A model that ignores context cannot beat the unigram loss at all, so any margin shows context was learned.
MIN_IMPROVEMENT = 0.10
#: Decode check: rel_err(decode, fp64) <= DECODE_FACTOR * rel_err(chunked forward, fp64) + floor. The decode path
#: rounds once per token where the chunked form rounds once per chunk, so it may be a few times less accurate
#: than the chunked forward, never orders of magnitude (a wrong decay power or a lost state is O(1)).
DECODE_FACTOR = 4.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=360, help="optimizer steps (default: ~2 min on 2 CPU cores)")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    train.add_argument("--seq-len", type=int, default=256, help="tokens (bytes) per training sequence")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup then cosine)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and sample")
    model = parser.add_argument_group("model")
    model.add_argument("--layers", type=int, default=4, help="Lightning Attention blocks")
    model.add_argument("--hidden", type=int, default=256, help="model width (bytes are the tokens: vocabulary 256)")
    model.add_argument("--heads", type=int, default=4, help="attention heads (head dim = hidden / heads)")
    model.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk of the chunked op")
    run_opts = parser.add_argument_group("device")
    run_opts.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    run_opts.add_argument(
        "--dtype", choices=["auto", *_DTYPES], default="auto",
        help="compute dtype (autocast; weights and states stay float32); auto: bfloat16 on CUDA, float32 on CPU",
    )
    run_opts.add_argument(
        "--backend", choices=["auto", "torch", "triton"], default="auto",
        help="kernels of the ops: auto = Triton on CUDA, torch on CPU",
    )
    out = parser.add_argument_group("evaluation and outputs")
    out.add_argument(
        "--min-improvement", type=float, default=MIN_IMPROVEMENT,
        help="required fraction by which the held-out loss must beat the unigram baseline",
    )
    out.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens to evaluate (at most)")
    out.add_argument("--prompt", default="The with statement", help="prompt of the generated sample")
    out.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate")
    out.add_argument("--checkpoint", type=Path, default=Path("lightning_demo/lightning_lm.pt"), help="where to save")
    out.add_argument("--plot", type=Path, help="loss curve PNG; default: loss.png beside the checkpoint")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class DecodeCheck:
    """max_abs_diff: max |decode - chunked| logits; errors are rel_err against the float64 model's logits."""

    max_abs_diff: float
    logit_scale: float
    decode_err: float
    chunked_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.decode_err <= self.tolerance


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda requested but CUDA is not available")
    return device


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokens, args, device, dtype) -> tuple[list[float], float]:
    """Returns (loss per step, seconds)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    losses, tokens_seen, start = [], 0, time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", disable=args.no_progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        batch = corpus.random_windows(tokens, args.batch_size, args.seq_len, generator)
        inputs, targets = (t.to(device) for t in batch)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr)
        with _autocast(device, dtype):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens_seen += inputs.numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - start):,.0f}")
    return losses, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, tokens, seq_len, max_tokens, device, dtype, batch_size=16) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the first ``max_tokens`` held-out tokens."""
    model.eval()
    n_windows = max(1, min(max_tokens, len(tokens) - 1) // seq_len)
    starts = torch.arange(n_windows) * seq_len
    total, count = 0.0, 0
    for batch in starts.split(batch_size):
        windows = torch.stack([tokens[s : s + seq_len + 1] for s in batch.tolist()]).to(device)
        with _autocast(device, dtype):
            logits = model(windows[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
        count += windows[:, 1:].numel()
    return total / count


@torch.no_grad()
def check_decode_path(model: LightningLM, tokens: torch.Tensor, decode_logits: torch.Tensor, dtype) -> DecodeCheck:
    """Compare decode-path logits with one chunked forward over the same tokens.

    ``tokens [B, T0 + n]`` and ``decode_logits [B, n, vocab]`` from :meth:`LightningLM.generate`. Both paths are
    judged against a float64 copy of the model run on the torch backend: the decode path passes when
    ``rel_err(decode) <= DECODE_FACTOR * rel_err(chunked) + floor``, floor = 4 unit roundoffs of the compute dtype.
    """
    model.eval()
    decode_logits = decode_logits.float()
    n = decode_logits.shape[1]
    device = tokens.device
    inputs = tokens[:, :-1]
    with _autocast(device, dtype):
        chunked = model(inputs)[:, -n:].float()
    model64 = copy.deepcopy(model).double()
    for module in model64.modules():
        if isinstance(module, LightningAttention):
            module.backend = "torch"
    exact = model64(inputs)[:, -n:]
    chunked_err = rel_err(chunked, exact)
    floor = 4 * torch.finfo(dtype).eps
    return DecodeCheck(
        max_abs_diff=(decode_logits - chunked).abs().max().item(),
        logit_scale=exact.abs().max().item(),
        decode_err=rel_err(decode_logits, exact),
        chunked_err=chunked_err,
        tolerance=DECODE_FACTOR * chunked_err + floor,
    )


def save_plot(path: Path, losses: list[float], val_loss: float, unigram: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed, skipping the loss curve (pip install lightning-attention[plot])")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="training loss")
    ax.axhline(unigram, color="grey", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.axhline(val_loss, color="tab:green", ls=":", label=f"held-out loss ({val_loss:.2f})")
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title="Lightning Attention LM on pydoc topics")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args) -> int:
    device = _device(args.device)
    dtype = _DTYPES["bfloat16" if device.type == "cuda" else "float32"] if args.dtype == "auto" else _DTYPES[args.dtype]
    backend = resolve_backend(args.backend, device)
    torch.manual_seed(args.seed)

    text = corpus.pydoc_topics_text()
    train_tokens, held_out = corpus.split_holdout(corpus.encode(text))
    config = LMConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        chunk_size=args.chunk_size, backend=args.backend,
    )
    model = LightningLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: pydoc_data.topics, {len(text):,} characters -> {len(train_tokens):,} training bytes, "
          f"{len(held_out):,} held out")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {n_params / 1e6:.2f}M parameters; "
          f"device {device}, dtype {str(dtype).replace('torch.', '')}, backend {backend}")
    print(f"training: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens")

    losses, seconds = train(model, train_tokens, args, device, dtype)
    print(f"trained in {seconds:.1f} s ({args.steps * args.batch_size * args.seq_len / seconds:,.0f} tokens/s)")

    val_loss = evaluate(model, held_out, args.seq_len, args.eval_tokens, device, dtype)
    unigram = corpus.unigram_loss(train_tokens, held_out)
    learned = val_loss <= (1 - args.min_improvement) * unigram
    print(f"held-out loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.2f} bits) vs unigram baseline "
          f"{unigram:.3f} ({unigram / math.log(2):.2f} bits): {100 * (1 - val_loss / unigram):.0f}% lower")

    prompt = corpus.encode(args.prompt)[None].to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with _autocast(device, dtype):
        out = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=generator)
    print("sample (decode path, state cache):\n" + "-" * 60 + "\n" + corpus.decode(out.tokens[0]) + "\n" + "-" * 60)

    check = check_decode_path(model, out.tokens, out.logits, dtype)
    print(f"decode path vs chunked forward: max |diff| {check.max_abs_diff:.2e} "
          f"(logits up to {check.logit_scale:.1f}); "
          f"error vs float64 model: decode {check.decode_err:.2e}, chunked {check.chunked_err:.2e} "
          f"(tolerance {check.tolerance:.2e})")

    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.checkpoint(step=args.steps, train_losses=losses, val_loss=val_loss, unigram_loss=unigram),
               args.checkpoint)
    print(f"checkpoint: {args.checkpoint}")
    plot = args.plot if args.plot is not None else args.checkpoint.with_name("loss.png")
    if save_plot(plot, losses, val_loss, unigram):
        print(f"loss curve: {plot}")

    failures = []
    if not learned:
        failures.append(f"held-out loss {val_loss:.3f} is not {args.min_improvement:.0%} below the unigram "
                        f"baseline {unigram:.3f}: the model did not learn (more --steps?)")
    if not check.passed:
        failures.append(f"decode-path logits disagree with the chunked forward: error {check.decode_err:.2e} "
                        f"> tolerance {check.tolerance:.2e}")
    for failure in failures:
        print(f"demo FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("demo OK")
    return 1 if failures else 0
