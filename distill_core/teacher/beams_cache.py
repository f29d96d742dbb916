"""Distilled beam search cache: every one of the teacher's N beam candidates per prompt, with scores.

One row per candidate, prompt-major and best first: prompt ids, candidate ids, summed teacher
log-probability, token count, length-normalised score and rank.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distill_core.cache.shards import object_array, ragged
from distill_core.cache.stage import ShardJob
from distill_core.config import BeamsConfig
from distill_core.data import DataRef
from distill_core.teacher.beam import beam_search
from distill_core.teacher.prompted import prompted_cache, prompts_of


def beams_job(cfg: BeamsConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The beams stage: content-addressed by the beam settings, teacher, tokenizer and prompt shape."""
    p = prompted_cache("beams", cfg, teacher, data)
    ids_type, ids_np = p.ids_type, p.ids_np

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, data_sha: str) -> pa.Table:
        prompts = prompts_of(input_ids, cfg.prompt_len)
        beams = beam_search(model, prompts, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                            length_penalty=cfg.length_penalty, eos_token_id=p.eos, pad_token_id=p.pad, batch_size=cfg.batch_size,
                            static_cache=cfg.decode != "dynamic", compile=cfg.decode == "compiled")
        rows = [(i, c) for i, cands in enumerate(beams) for c in cands]
        return pa.table({
            "prompt_id": pa.array([int(seq_ids[i]) for i, _ in rows], pa.int64()),
            "rank": pa.array([c.rank for _, c in rows], pa.int32()),
            "prompt_ids": pa.array([np.asarray(prompts[i], ids_np) for i, _ in rows], pa.list_(ids_type)),
            "completion_ids": pa.array([np.asarray(c.completion_ids, ids_np) for _, c in rows], pa.list_(ids_type)),
            "sum_logprob": pa.array([c.sum_logprob for _, c in rows], pa.float32()),
            "n_tokens": pa.array([c.n_tokens for _, c in rows], pa.int32()),
            "score": pa.array([c.score for _, c in rows], pa.float32()),
        })

    return ShardJob(ref=p.ref, rows=cfg.num_prompts, compute=compute)


BEAMS_COLUMNS = ("prompt_ids", "completion_ids", "score")  # the columns read_beams_table reads


def read_beams_table(table, num_beams: int) -> dict[str, np.ndarray]:
    """A beams shard (one row per candidate, best first within a prompt) grouped per prompt."""
    prompts, completions = ragged(table["prompt_ids"]), ragged(table["completion_ids"])
    scores = table["score"].to_numpy()
    n = table.num_rows // num_beams
    return {
        "prompt_ids": object_array([prompts[i * num_beams] for i in range(n)]),
        "candidates": object_array([list(completions[i * num_beams : (i + 1) * num_beams]) for i in range(n)]),
        "scores": scores.reshape(n, num_beams),
    }
