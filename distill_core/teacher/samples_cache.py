"""Sequence-level KD cache: the teacher's sampled continuations of prompts from the train data.

One row per (prompt, sample): prompt ids, completion ids, the teacher's log-probability of each
sampled token, why it stopped, and optionally the teacher's top-k at every completion position
(from the same forward passes, so SeqKD and soft targets combine without a second teacher pass).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distill_core.cache.shards import object_array, ragged
from distill_core.cache.stage import ShardJob, shard_seed
from distill_core.config import SamplesConfig
from distill_core.data import DataRef
from distill_core.teacher.prompted import prompted_cache, prompts_of
from distill_core.teacher.sample import sample


def samples_job(cfg: SamplesConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The samples stage: content-addressed by the sampling settings, teacher, tokenizer and prompt shape."""
    p = prompted_cache("samples", cfg, teacher, data)
    ids_type, ids_np = p.ids_type, p.ids_np

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, data_sha: str) -> pa.Table:
        prompts = prompts_of(input_ids, cfg.prompt_len)
        results = sample(
            model, prompts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=p.eos, pad_token_id=p.pad,
            seed=shard_seed(cfg.seed, data_sha), batch_size=cfg.batch_size,
            soft_topk=cfg.soft_topk, soft_temperature=cfg.soft_temperature,
            static_cache=cfg.decode != "dynamic", compile=cfg.decode == "compiled",
        )
        columns = {
            "prompt_id": pa.array([int(seq_ids[r.prompt_index]) for r in results], pa.int64()),
            "sample_idx": pa.array([r.sample_idx for r in results], pa.int32()),
            "prompt_ids": pa.array([np.asarray(prompts[r.prompt_index], ids_np) for r in results], pa.list_(ids_type)),
            "completion_ids": pa.array([np.asarray(r.completion_ids, ids_np) for r in results], pa.list_(ids_type)),
            "token_logprobs": pa.array([np.asarray(r.token_logprobs, np.float32) for r in results], pa.list_(pa.float32())),
            "finish_reason": pa.array([r.finish_reason for r in results], pa.string()),
        }
        if cfg.soft_topk:
            columns.update(soft_columns([(r.topk_ids, r.topk_logprobs, r.tail_logprob) for r in results], ids_type))
        return pa.table(columns)

    return ShardJob(ref=p.ref, rows=cfg.num_prompts, compute=compute)


def soft_columns(rows: list[tuple], ids_type: pa.DataType) -> dict[str, pa.Array]:
    """The soft-target columns of completion rows: each row's (ids [n, k], logprobs [n, k], tail [n]) top-k
    at its n completion positions (tensors or arrays), flattened one list per row; read back by
    :func:`read_samples_table`."""
    ids_np = ids_type.to_pandas_dtype()
    return {
        "topk_ids": pa.array([np.asarray(ids).astype(ids_np).reshape(-1) for ids, _, _ in rows], pa.list_(ids_type)),
        # float16 keeps ~3 significant digits of a log-probability: ample for targets, half the bytes.
        "topk_logprobs": pa.array([np.asarray(lps).astype(np.float16).reshape(-1) for _, lps, _ in rows], pa.list_(pa.float16())),
        "tail_logprob": pa.array([np.asarray(tail).astype(np.float32) for _, _, tail in rows], pa.list_(pa.float32())),
    }


SOFT_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")  # per completion position, with samples.soft_topk


def samples_columns(soft_k: int) -> tuple[str, ...]:
    """The columns read_samples_table reads."""
    return ("prompt_ids", "completion_ids") + (SOFT_COLUMNS if soft_k else ())


def read_samples_table(table, soft_k: int) -> dict[str, np.ndarray]:
    """A samples shard as per-row object arrays: prompt_ids, completion_ids [, topk_ids [n,k], topk_logprobs, tail_logprob]."""
    out = {
        "prompt_ids": ragged(table["prompt_ids"]),
        "completion_ids": ragged(table["completion_ids"]),
    }
    if soft_k:
        ids, lps, tail = ragged(table["topk_ids"]), ragged(table["topk_logprobs"]), ragged(table["tail_logprob"])
        out["topk_ids"] = object_array([a.astype(np.int64).reshape(-1, soft_k) for a in ids])
        out["topk_logprobs"] = object_array([a.astype(np.float32).reshape(-1, soft_k) for a in lps])
        out["tail_logprob"] = object_array([a.astype(np.float32) for a in tail])
    return out
