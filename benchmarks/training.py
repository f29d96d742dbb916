"""Throughput and peak memory of the student's training step: eager against ``train.compile``, with the
divergence computed whole or chunked (``train.loss_chunk_rows``).

Every loop runs the inner step of ``distill_core.train.train`` on the same random batches: forward
under autocast (bfloat16 on CUDA), ``loss_step`` with 0.5·forward_kl on top-k targets + 0.5·ce,
backward, gradient clipping and an AdamW step. Each loop trains its own copy of the same random
student. Figure: trained tokens/s = steps × batch × sequence length / seconds; one warm-up run per
loop (which also compiles), then ``--repeats`` timed runs taking turns between the loops, best kept,
in one process. Peak memory (CUDA only) is read in one more run per loop.

    python benchmarks/training.py                       # tiny model, CPU, < 2 min on 2 cores
    PYTHONPATH=. python3 benchmarks/training.py --device cuda --model gpt2-124m-random \\
        --batch-size 16 --seq-len 1024 --chunk-rows 2048 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy

import torch
from generation import MODELS, build_model, table, time_loops  # same folder

from distill_core.batches import Batch, StepBatch
from distill_core.config import LossTerm
from distill_core.losses.signals import TopKTargets
from distill_core.train import loss_step

TERMS = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int, k: int, device: str) -> list[StepBatch]:
    """``n`` micro-batches of random ids with random top-k targets (most probable first, plus a tail)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        logprobs = torch.log_softmax(torch.randn(batch_size, seq_len - 1, k + 1, generator=gen) * 3, dim=-1)
        top = logprobs[..., :k].sort(dim=-1, descending=True).values
        targets = TopKTargets(torch.randint(0, vocab, (batch_size, seq_len - 1, k), generator=gen), top, logprobs[..., k])
        out.append(StepBatch(data=Batch(ids, torch.ones(batch_size, seq_len - 1, dtype=torch.bool), targets)).to(device))
    return out


def trainer(student: torch.nn.Module, batches: list[StepBatch], *, compile: bool, chunk_rows: int | None, device: str):
    """A function that runs one optimizer step per batch, as ``train()`` does."""
    model = torch.compile(student) if compile else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def run() -> None:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, _ = loss_step(model, batch, TERMS, tail="bucket", temperatures={"data": 1.0}, chunk_rows=chunk_rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        loss.item()  # wait for the last step

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32, help="teacher top-k")
    parser.add_argument("--chunk-rows", type=int, default=256, help="train.loss_chunk_rows for the chunked loops")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = build_model(args.model, args.device, "float32").train()
    batches = random_batches(args.steps, args.batch_size, args.seq_len, base.config.vocab_size, args.k, args.device)
    variants = {
        "eager": dict(compile=False, chunk_rows=None),
        f"eager, loss_chunk_rows={args.chunk_rows}": dict(compile=False, chunk_rows=args.chunk_rows),
        "compile": dict(compile=True, chunk_rows=None),
        f"compile, loss_chunk_rows={args.chunk_rows}": dict(compile=True, chunk_rows=args.chunk_rows),
    }
    loops = {name: trainer(copy.deepcopy(base), batches, device=args.device, **kw) for name, kw in variants.items()}
    seconds = time_loops(loops, args.device, args.repeats)
    peaks = {}
    if args.device.startswith("cuda"):
        for name, run in loops.items():
            torch.cuda.reset_peak_memory_stats()
            run()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30

    tokens = args.steps * args.batch_size * args.seq_len
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model={args.model} device={device_name} batch={args.batch_size}x{args.seq_len} k={args.k} steps={args.steps} "
        f"vocab={base.config.vocab_size} torch={torch.__version__}"
    )
    eager = seconds["eager"]
    rows = [
        (name, f"{tokens}", f"{s:.2f}", f"{tokens / s:,.0f}", f"{eager / s:.2f}x", f"{peaks[name]:.1f}" if name in peaks else "-")
        for name, s in seconds.items()
    ]
    print(table(rows, ("loop", "tokens", "seconds", "tokens/s", "vs eager", "peak GiB")))


if __name__ == "__main__":
    main()
