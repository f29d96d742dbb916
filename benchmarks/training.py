"""Throughput and peak memory of the student's training step: eager against ``train.compile``, and the
model's own logits against the fused LM head + loss (``train.loss_chunk_rows``).

Every loop runs ``distill_core.train.train_step``, the product's optimizer step, on the same random
batches: forward under autocast (bfloat16 on CUDA), ``loss_step`` with 0.5·forward_kl on top-k targets
+ 0.5·ce (bucket tail), backward, gradient clipping and an AdamW step.

Default mode (``--loops``): one process, every loop on its own copy of the same random student; one
warm-up run per loop (which also compiles), then ``--repeats`` timed runs taking turns, best kept.
Figure: trained tokens/s = steps × batch × sequence length / seconds.

``--memory``: each variant in its own process (peak RSS on CPU, ``max_memory_allocated`` on CUDA, so
one variant's allocations cannot hide another's), the same student init and batches in each:
  body      the bare body forward + backward (a cheap loss on the final hidden states) and the AdamW step
  ce        plain CE training through the model's logits (``loss_chunk_rows`` null)
  kd        today's KD step through the model's logits (``loss_chunk_rows`` null)
  kd-fused  the KD step with the fused head + loss (``loss_chunk_rows`` = ``--chunk-rows``)
Each reports its median step time over ``--steps`` steps and its peak; the table gives each variant's
peak above ``body`` and the ratios against ``kd``.

    python benchmarks/training.py                       # tiny model, CPU, < 2 min on 2 cores
    python benchmarks/training.py --memory --layers 2 --batch-size 8 --seq-len 1025 --chunk-rows 1024 \\
        --steps 3 --threads 1 --variants body,kd,kd-fused      # B·T = 8192 loss rows, V = 50,257
    PYTHONPATH=. python3 benchmarks/training.py --device cuda --model gpt2-124m-random \\
        --batch-size 16 --seq-len 1024 --chunk-rows 2048 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from generation import MODELS, build_model, sync, table, time_loops  # same folder

from distill_core.batches import Batch, StepBatch
from distill_core.config import LossTerm, TrainConfig
from distill_core.losses.signals import TopKTargets
from distill_core.train import body_and_head, train_step

TERMS = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]
VARIANTS = ("body", "ce", "kd", "kd-fused")


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


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


def trainer(student: torch.nn.Module, batches: list[StepBatch], *, compile: bool, chunk_rows: int | None, device: str,
            terms: list[LossTerm] = TERMS):
    """A function that runs one ``train_step`` per batch, as ``train()`` does; it returns the step losses."""
    model = torch.compile(student) if compile else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95))
    cfg = TrainConfig(loss_chunk_rows=chunk_rows, compile=compile, tail="bucket", grad_clip=1.0, device="cpu")

    def run() -> list[float]:
        # train_step reads each loss with .item(): every step ends synchronised.
        return [train_step(model, student, optimizer, [batch], terms, cfg, temperatures={"data": 1.0},
                           autocast=_autocast(device))["loss"] for batch in batches]

    return run


def body_trainer(student: torch.nn.Module, batches: list[StepBatch], device: str):
    """The step without the head and loss: body forward, a cheap loss on its hidden states, backward, AdamW."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95))

    def run() -> list[float]:
        losses = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                hidden, _, _ = body_and_head(student, batch["data"].input_ids)
                loss = hidden.float().square().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
        return losses

    return run


def _student(args) -> torch.nn.Module:
    base = build_model(args.model, args.device, "float32", n_layer=args.layers, n_positions=max(256 if args.model == "tiny" else 1024, args.seq_len)).train()
    for module in base.modules():  # dropout off: every variant computes the same function of the same init
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return base


def peak_bytes(device: str) -> int:
    """This process's peak: CUDA ``max_memory_allocated``, else the resident-set high-water mark (VmHWM)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args) -> dict:
    """One ``--memory`` variant in this process: per-step seconds, losses and the process's peak."""
    student = _student(args)
    batch = random_batches(1, args.batch_size, args.seq_len, student.config.vocab_size, args.k, args.device)
    if args.child == "body":
        run = body_trainer(student, batch, args.device)
    else:
        terms = [LossTerm(name="ce")] if args.child == "ce" else TERMS
        run = trainer(student, batch, compile=False, chunk_rows=args.chunk_rows if args.child == "kd-fused" else None,
                      device=args.device, terms=terms)
    seconds, losses = [], []
    for _ in range(args.steps):  # one step per call, each timed
        sync(args.device)
        t0 = time.perf_counter()
        losses += run()
        sync(args.device)
        seconds.append(time.perf_counter() - t0)
    return {"variant": args.child, "seconds": seconds, "losses": losses, "peak_bytes": peak_bytes(args.device)}


def memory_main(args) -> None:
    """Run each variant in a child process and print the side-by-side table."""
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {VARIANTS}")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", file=sys.stderr)
    tokens = args.batch_size * args.seq_len
    rows_per_step = args.batch_size * (args.seq_len - 1)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads or torch.get_num_threads()} threads"
    print(f"model={args.model} layers={args.layers or 'all'} device={device_name} batch={args.batch_size}x{args.seq_len} "
          f"(loss rows {rows_per_step}) k={args.k} chunk_rows={args.chunk_rows} steps={args.steps} torch={torch.__version__}")
    body = results.get("body", {}).get("peak_bytes")
    kd, ce = results.get("kd"), results.get("ce")
    rows = []
    for name, r in results.items():
        median = statistics.median(r["seconds"])
        above = (r["peak_bytes"] - body) if body is not None else None
        kd_above = (kd["peak_bytes"] - body) if kd and body is not None else None
        kd_median = statistics.median(kd["seconds"]) if kd else None
        rows.append((
            name, f"{median:.1f}", f"{tokens / median:,.0f}", f"{r['peak_bytes'] / 2**30:.2f}",
            f"{above / 2**30:.2f}" if above is not None else "-",
            f"{above / kd_above:.2f}×" if kd_above and name != "body" else "-",
            f"{kd_median / median:.2f}×" if kd_median and name != "body" else "-",
            f"{r['peak_bytes'] / ce['peak_bytes']:.2f}×" if ce and name != "body" else "-",
            f"{r['losses'][0]:.6f}",
        ))
    print(table(rows, ("variant", "median step s", "tokens/s", "peak GiB", "peak above body GiB", "above-body vs kd",
                       "tokens/s vs kd", "peak vs ce", "loss (step 1)")))


def loops_main(args) -> None:
    base = _student(args)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count (e.g. 2 for CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32, help="teacher top-k")
    parser.add_argument("--chunk-rows", type=int, default=256, help="train.loss_chunk_rows for the fused loops")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed run (--memory: steps per variant)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="each variant in its own process: peak memory and median step")
    parser.add_argument("--variants", default="body,ce,kd,kd-fused", help=f"--memory: comma-separated, of {VARIANTS}")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_variant(args)))
    elif args.memory:
        memory_main(args)
    else:
        loops_main(args)


if __name__ == "__main__":
    main()
