"""Bytes and decode speed of the top-k cache's codec, per strategy, on the embedded setup.

    python benchmarks/codec.py [--config deployments/demo.yaml] [--root DIR] [--rows N] [--threads N]

One teacher forward pass per batch of train sequences serves every row of the table: each strategy
keeps what it keeps of the same logits (``sparse_from_logits``), shards of ``data.rows_per_shard``
sequences are encoded (``codec.encode_table``) and written as zstd Parquet exactly as the cache
stage writes them; the float16 codec of earlier caches (uint16/uint32 ids, float16 log-probabilities,
float32 tail) is the baseline. Bytes per kept logit = shard bytes / ids kept (unique ids for draws);
bytes per token = shard bytes / positions. Decode: shard bytes → the arrays training batches are
built from (``read_targets``), in positions per second on one thread.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill_core.cache import codec
from distill_core.cache.shards import list_array, table_to_parquet_bytes
from distill_core.config import TopKConfig, load_config
from distill_core.data import id_type, prepare_data, read_sequences
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.storage import Storage
from distill_core.teacher.load import load_teacher, load_tokenizer, resolve_teacher
from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

STRATEGIES = {
    "topk k=32": TopKConfig(k=32),
    "topk k=32, T=[1,2,4]": TopKConfig(k=32, temperatures=[2.0, 4.0]),
    "sampled m=32": TopKConfig(strategy="sampled", draws=32),
    "sampled m=64": TopKConfig(strategy="sampled", draws=64),
    "hybrid k=16 + m=16": TopKConfig(strategy="hybrid", k=16, draws=16),
}


def _meta(cfg: TopKConfig) -> dict:
    return {"strategy": cfg.strategy, "k": 0 if cfg.strategy == "sampled" else cfg.k, "temperature": cfg.temperature,
            "temperatures": cfg.served_temperatures(), "codec": codec.CODEC, "draws": cfg.draws}


def _float16_table(seq_ids: np.ndarray, logits: torch.Tensor, k: int, ids_type) -> pa.Table:
    """A shard in the float16 codec (caches written before ``codec``)."""
    t = topk_targets_from_logits(logits, k, 1.0)
    n = len(seq_ids)
    return pa.table({
        "seq_id": pa.array(seq_ids, pa.int64()),
        "ids": list_array(t.ids.reshape(n, -1).numpy().astype(ids_type.to_pandas_dtype()), ids_type),
        "logprobs": list_array(t.logprobs.reshape(n, -1).numpy().astype(np.float16), pa.float16()),
        "tail_logprob": list_array(t.tail_logprob.numpy(), pa.float32()),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/demo.yaml")
    parser.add_argument("--root", default=None, help="storage root (default: the config's)")
    parser.add_argument("--rows", type=int, default=None, help="train sequences used (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    storage = Storage(args.root or cfg.storage.root, cfg.storage.options)
    teacher = resolve_teacher(cfg.teacher, storage)
    data = prepare_data(cfg.data, load_tokenizer(teacher, storage), teacher.tokenizer_hash, storage)
    model = load_teacher(teacher, storage, device="cpu", dtype=torch.float32)[0]
    shard_rows, batch = cfg.data.rows_per_shard, cfg.topk.batch_size

    shards: dict[str, list[tuple[bytes, int, int]]] = {name: [] for name in ["float16 codec k=32", *STRATEGIES]}
    done, t0 = 0, time.perf_counter()
    for _, seq_ids, input_ids in read_sequences(storage, data.train):
        for s0 in range(0, len(seq_ids), shard_rows):
            if args.rows is not None and done >= args.rows:
                break
            take = shard_rows if args.rows is None else min(shard_rows, args.rows - done)
            ids, x = seq_ids[s0 : s0 + take], input_ids[s0 : s0 + take]
            parts = {name: [] for name in STRATEGIES}
            logits_all = []
            for b0 in range(0, len(ids), batch):
                with torch.inference_mode():
                    logits = model(input_ids=torch.from_numpy(x[b0 : b0 + batch])).logits[:, :-1].float()
                    logits_all.append(logits)
                    for name, scfg in STRATEGIES.items():
                        u = draw_uniforms(scfg.seed, ids[b0 : b0 + batch], logits.shape[1], scfg.draws) if scfg.strategy != "topk" else None
                        parts[name].append(sparse_from_logits(logits, scfg, u))
            positions = len(ids) * (x.shape[1] - 1)
            legacy = table_to_parquet_bytes(_float16_table(ids, torch.cat(logits_all), 32, id_type(data.vocab_size)))
            shards["float16 codec k=32"].append((legacy, positions * 32, positions))
            for name, scfg in STRATEGIES.items():
                rows = codec.concat(parts[name])
                table = codec.encode_table(ids, rows, scfg.served_temperatures())
                shards[name].append((table_to_parquet_bytes(table), int(rows.sizes().sum()), positions))
            done += len(ids)
            print(f"{done} sequences in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\n{done} train sequences of {data.seq_len} tokens ({sum(p for _, _, p in shards['topk k=32'])} positions), "
          f"shards of {shard_rows}, vocabulary {data.vocab_size}.")
    print("| strategy | kept ids / position | bytes / kept logit | bytes / token | vs float16 codec | decode positions/s |")
    print("|---|---|---|---|---|---|")
    base = sum(len(b) for b, _, _ in shards["float16 codec k=32"])
    for name, entries in shards.items():
        nbytes = sum(len(b) for b, _, _ in entries)
        kept, positions = sum(k for _, k, _ in entries), sum(p for _, _, p in entries)
        scfg = STRATEGIES.get(name)
        meta = _meta(scfg) if scfg else {"k": 32, "temperature": 1.0}
        t1 = time.perf_counter()
        for blob, _, _ in entries:
            read_targets(pq.read_table(io.BytesIO(blob)), meta, 1.0)
        rate = positions / (time.perf_counter() - t1)
        print(f"| {name} | {kept / positions:.1f} | {nbytes / kept:.2f} | {nbytes / positions:.1f} | {nbytes / base:.2f}× | {rate:,.0f} |")


if __name__ == "__main__":
    main()
