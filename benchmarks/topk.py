"""The top-k stage end to end (teacher forward → top-k → Arrow → zstd Parquet on local disk → commit)
against the bare teacher forward on the same batches; the stage serial and with its shard writer
overlapped (``distill_core.cache.stage.run_all(overlap=...)``).

Random-weight GPT-2 teacher, random token ids written as prepared data shards. Each loop runs once
for warm-up, then ``--repeats`` timed runs taking turns, best kept; every stage run writes a fresh
cache folder. Figure: teacher tokens/s and the ratio to the bare forward.

    python benchmarks/topk.py --layers 12 --shards 4 --rows 8 --seq-len 128 --threads 1
    PYTHONPATH=. python3 benchmarks/topk.py --device cuda --shards 8 --rows 64 --seq-len 1024 --batch-size 32
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import torch
from generation import MODELS, build_model, table, time_loops  # same folder

from distill_core.cache import stage
from distill_core.cache.shards import ShardStore, list_array
from distill_core.config import TopKConfig
from distill_core.data import DataRef, id_type, read_data_shard
from distill_core.storage import Storage
from distill_core.teacher.topk import topk_job

TEACHER = {"source": "random", "fingerprint": "r" * 16, "dtype": "float32"}


def random_data(storage: Storage, shards: int, rows: int, seq_len: int, vocab: int) -> DataRef:
    """``shards`` train shards of ``rows`` random sequences each, as ``prepare_data`` writes them."""
    rng = np.random.default_rng(0)
    ids = id_type(vocab)
    meta = {"tokenizer_hash": "random", "seq_len": seq_len, "vocab_size": vocab, "source": "random"}
    for split, count in (("train", shards), ("validation", 1)):
        store = ShardStore(storage, f"data/random/{split}", kind="data", fingerprint="random", meta=meta)
        for index in range(count):
            chunk = rng.integers(0, vocab, (rows, seq_len))
            store.write_shard(f"part-{index:05d}.parquet", pa.table({
                "seq_id": pa.array(np.arange(index * rows, (index + 1) * rows), pa.int64()),
                "input_ids": list_array(chunk.astype(ids.to_pandas_dtype()), ids),
            }))
        store.finalize({"rows": count * rows, "tokens": count * rows * seq_len})
    return DataRef("random", "data/random", "random", seq_len, vocab, shards * rows, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="gpt2-124m-random", choices=MODELS)
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="sequences per shard")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="topk.batch_size")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.device, "float32", n_layer=args.layers)
    root = tempfile.mkdtemp(prefix="topk-bench-")
    data_storage = Storage(f"{root}/data-root")
    data = random_data(data_storage, args.shards, args.rows, args.seq_len, model.config.vocab_size)
    cfg = TopKConfig(k=args.k, batch_size=args.batch_size)
    batches = [
        torch.from_numpy(input_ids[start : start + args.batch_size]).to(args.device)
        for name in (f"part-{i:05d}.parquet" for i in range(args.shards))
        for input_ids in [read_data_shard(data_storage, data.train, name)[1]]
        for start in range(0, args.rows, args.batch_size)
    ]
    runs = itertools.count()

    @torch.inference_mode()
    def forward() -> None:
        # The same precision as the stage's forward (teacher_topk): bfloat16 autocast on CUDA.
        with torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else nullcontext():
            for batch in batches:
                model(input_ids=batch).logits[0, -1, 0].item()  # .item(): wait for the device

    def stage_run(overlap: bool):
        def run() -> None:
            storage = Storage(f"{root}/run-{next(runs)}")
            storage.upload_dir(data_storage.local_path(data.folder), data.folder)
            stage.run_all(topk_job(cfg, TEACHER, data), lambda: model, data, storage, overlap=overlap)

        return run

    loops = {"bare forward": forward, "stage, serial": stage_run(False), "stage, overlapped writer": stage_run(True)}
    seconds = time_loops(loops, args.device, args.repeats)
    tokens = args.shards * args.rows * args.seq_len
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model={args.model} layers={args.layers or 'all'} device={device_name} shards={args.shards}x{args.rows}x{args.seq_len} "
          f"batch={args.batch_size} k={args.k} vocab={model.config.vocab_size} torch={torch.__version__}")
    bare = seconds["bare forward"]
    rows = [(name, f"{tokens}", f"{s:.2f}", f"{tokens / s:,.0f}", f"{bare / s:.2f}×") for name, s in seconds.items()]
    print(table(rows, ("loop", "tokens", "seconds", "tokens/s", "vs bare forward")))


if __name__ == "__main__":
    main()
