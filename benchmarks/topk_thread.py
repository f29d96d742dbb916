"""The top-k of a batch in series after the teacher's forward vs the stage's own loop
(``distill_core.teacher.topk._topk_table``: on a second thread while the next forward runs, where the
forward leaves a core free; in series where it has them all), against the bare forward, on the same
model and batches; no Parquet (``benchmarks/topk.py`` times the whole stage).

    python benchmarks/topk_thread.py --threads 1 --batches 4 --batch-size 8 --seq-len 128 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distill_core.cache import codec
from distill_core.config import TopKConfig
from distill_core.teacher.topk import _topk_table, _worker_threads, sparse_from_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2-124M shape, random weights
    cfg = TopKConfig(k=args.k, batch_size=args.batch_size)
    rows = args.batches * args.batch_size
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (rows, args.seq_len))
    seq_ids = np.arange(rows)

    def batches():
        for start in range(0, rows, args.batch_size):
            yield torch.from_numpy(ids[start : start + args.batch_size])

    def bare():
        with torch.inference_mode():
            for batch in batches():
                model(input_ids=batch).logits

    def in_series():  # the plain path: each batch's top-k after its forward, on the same thread
        with torch.inference_mode():
            parts = [sparse_from_logits(model(input_ids=batch).logits[:, :-1], cfg) for batch in batches()]
        return codec.encode_table(seq_ids, codec.concat(parts), cfg.served_temperatures())

    def own_thread():
        return _topk_table(model, seq_ids, ids, cfg, torch.device("cpu"))

    stage_loop = "stage's loop, " + ("own thread" if _worker_threads(torch.device("cpu")) else "in series: no core free")
    loops = {"bare forward": bare, "top-k in series": in_series, stage_loop: own_thread}
    if not in_series().equals(own_thread()):
        raise SystemExit("the two top-k paths disagree")
    times = {name: [] for name in loops}
    for _ in range(args.repeats):  # taking turns, so drifting machine load hits every loop alike
        for name, loop in loops.items():
            start = time.perf_counter()
            loop()
            times[name].append(time.perf_counter() - start)
    base = min(times["bare forward"])
    print(f"GPT-2-124M random, {rows} rows × {args.seq_len}, batch {args.batch_size}, k={args.k}, torch threads {args.threads}")
    print("| loop | best s | median s | vs bare forward (best) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {min(t):.2f} | {np.median(t):.2f} | {base / min(t):.2f}× |")


if __name__ == "__main__":
    main()
