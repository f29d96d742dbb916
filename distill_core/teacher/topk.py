"""Soft targets: the teacher's top-k log-probabilities (plus tail mass) at every training position.

Only ids and log-probabilities of the top-k leave the device; the full-vocabulary logits never do.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from distill_core.cache import stage
from distill_core.cache.ref import CacheRef, teacher_cache_ref
from distill_core.cache.shards import list_array
from distill_core.cache.stage import ShardJob
from distill_core.config import TopKConfig
from distill_core.data import DataRef, id_type
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.storage import Storage

Progress = Callable[[int, int], None]


def topk_cache_ref(cfg: TopKConfig, teacher: dict, data: DataRef) -> CacheRef:
    """The content address of a top-k cache (see :func:`teacher_cache_ref`): k and temperature."""
    return teacher_cache_ref("topk", {"k": cfg.k, "temperature": cfg.temperature}, teacher, data)


@torch.inference_mode()
def teacher_topk(model, input_ids: torch.Tensor, k: int, temperature: float):
    """Top-k targets for the T-1 positions that have a next token.

    input_ids: int64 [B, T] on the model's device. Returns TopKTargets with ids [B, T-1, k],
    logprobs [B, T-1, k] float32, tail_logprob [B, T-1] float32.
    """
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if input_ids.is_cuda else nullcontext()
    with autocast:
        logits = model(input_ids=input_ids).logits[:, :-1]
    return topk_targets_from_logits(logits, k, temperature)


def topk_job(cfg: TopKConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The top-k stage as a ShardJob: one cache shard per train data shard, every row of it."""
    ids_type = id_type(data.vocab_size)

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, _data_sha256: str) -> pa.Table:
        return _topk_table(model, seq_ids, input_ids, cfg, next(model.parameters()).device, ids_type)

    return ShardJob(ref=topk_cache_ref(cfg, teacher, data), rows=None, compute=compute)


def cache_topk(
    load_model: Callable[[], torch.nn.Module], data: DataRef, teacher: dict, cfg: TopKConfig, storage: Storage,
    progress: Progress | None = None,
) -> CacheRef:
    """Write top-k shards for every train shard of ``data`` not yet in the cache; returns the cache ref.

    The whole stage in one process (see :mod:`distill_core.cache.stage`); ``load_model`` is called
    once, and only when some shard is missing, so a finished cache costs no teacher load."""
    return stage.run_all(topk_job(cfg, teacher, data), load_model, data, storage, progress)


def _topk_table(model, seq_ids: np.ndarray, input_ids: np.ndarray, cfg: TopKConfig, device, ids_type) -> pa.Table:
    ids_out, lp_out, tail_out = [], [], []
    for start in range(0, len(input_ids), cfg.batch_size):
        batch = torch.from_numpy(input_ids[start : start + cfg.batch_size]).to(device)
        t = teacher_topk(model, batch, cfg.k, cfg.temperature)
        b = batch.shape[0]
        ids_out.append(t.ids.reshape(b, -1).cpu().numpy().astype(ids_type.to_pandas_dtype()))
        # float16 keeps ~3 significant digits of a log-probability: ample for targets, half the bytes.
        lp_out.append(t.logprobs.reshape(b, -1).cpu().numpy().astype(np.float16))
        tail_out.append(t.tail_logprob.cpu().numpy().astype(np.float32))
    ids, lps, tails = np.concatenate(ids_out), np.concatenate(lp_out), np.concatenate(tail_out)
    return pa.table({
        "seq_id": pa.array(seq_ids, pa.int64()),
        "ids": list_array(ids, ids_type),
        "logprobs": list_array(lps, pa.float16()),
        "tail_logprob": list_array(tails, pa.float32()),
    })


TOPK_COLUMNS = ("seq_id", "ids", "logprobs", "tail_logprob")  # what _topk_table writes


def read_topk_table(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unpack a top-k shard: seq_ids [n], ids int64 [n, T-1, k], logprobs float32 [n, T-1, k], tail float32 [n, T-1]."""
    n = table.num_rows
    flat = lambda name: table[name].combine_chunks().values.to_numpy(zero_copy_only=False)  # noqa: E731
    ids = flat("ids").astype(np.int64).reshape(n, -1, k)
    lps = flat("logprobs").astype(np.float32).reshape(n, -1, k)
    tail = flat("tail_logprob").astype(np.float32).reshape(n, -1)
    return table["seq_id"].to_numpy(), ids, lps, tail
