"""Distilled beam search cache: every one of the teacher's N beam candidates per prompt, with scores.

One row per candidate, prompt-major and best first: prompt ids, candidate ids, summed teacher
log-probability, token count, length-normalised score and rank.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distill_core.cache.ref import CacheRef
from distill_core.cache.shards import SCHEMA_VERSION
from distill_core.cache.stage import ShardJob
from distill_core.config import BeamsConfig
from distill_core.data import DataRef, id_type
from distill_core.errors import ConfigError
from distill_core.storage import fingerprint
from distill_core.teacher.beam import beam_search


def beams_job(cfg: BeamsConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The beams stage: content-addressed by the beam settings, teacher, tokenizer and prompt shape."""
    if cfg.prompt_len >= data.seq_len:
        raise ConfigError(f"beams.prompt_len {cfg.prompt_len} must be below data.seq_len {data.seq_len}: prompts are cut from train sequences.")
    meta = {
        "teacher": teacher["source"],
        "teacher_fingerprint": teacher["fingerprint"],
        "tokenizer_hash": data.tokenizer_hash,
        "seq_len": data.seq_len,
        "vocab_size": data.vocab_size,
        "schema_version": SCHEMA_VERSION,
        **cfg.model_dump(exclude={"batch_size"}),
    }
    fp = fingerprint({"kind": "beams", **meta})
    ref = CacheRef(kind="beams", folder=f"caches/beams/{fp}", fingerprint=fp, meta=meta)
    ids_type = id_type(data.vocab_size)
    eos = teacher.get("eos_token_id")
    pad = eos if eos is not None else 0

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, data_sha: str) -> pa.Table:
        prompts = [row[: cfg.prompt_len].tolist() for row in input_ids]
        beams = beam_search(model, prompts, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                            length_penalty=cfg.length_penalty, eos_token_id=eos, pad_token_id=pad, batch_size=cfg.batch_size)
        rows = [(i, c) for i, cands in enumerate(beams) for c in cands]
        ids_np = ids_type.to_pandas_dtype()
        return pa.table({
            "prompt_id": pa.array([int(seq_ids[i]) for i, _ in rows], pa.int64()),
            "rank": pa.array([c.rank for _, c in rows], pa.int32()),
            "prompt_ids": pa.array([np.asarray(prompts[i], ids_np) for i, _ in rows], pa.list_(ids_type)),
            "completion_ids": pa.array([np.asarray(c.completion_ids, ids_np) for _, c in rows], pa.list_(ids_type)),
            "sum_logprob": pa.array([c.sum_logprob for _, c in rows], pa.float32()),
            "n_tokens": pa.array([c.n_tokens for _, c in rows], pa.int32()),
            "score": pa.array([c.score for _, c in rows], pa.float32()),
        })

    return ShardJob(ref=ref, rows=cfg.num_prompts, compute=compute)
