"""On-policy distillation's cache: the student writes continuations of train prompts, the teacher grades them.

The teacher scores text it did not write: one forward pass over each batch of (prompt + student
completion) sequences gives its top-k soft targets at every completion position, in the encoding of
the samples cache's soft columns (so ``read_samples_table`` and the samples collation read it), and its
log-probability of each token the student wrote (the teacher-scored NLL a round reports).

The cache is content-addressed like every teacher cache (same shard store, manifest and repair path),
and its address also holds the fingerprint of the sampling student's weights: a new student means new
work, the same student none.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from distill_core.cache.ref import CacheRef, teacher_cache_ref
from distill_core.cache.stage import ShardJob, shard_seed
from distill_core.config import StudentSamplesConfig, TopKConfig
from distill_core.data import DataRef, id_type
from distill_core.errors import ConfigError
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.teacher.prompted import prompts_of
from distill_core.teacher.sample import sample
from distill_core.teacher.samples_cache import soft_columns

KIND = "student_samples"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's weights: every state-dict tensor's name, dtype, shape and bytes (16 hex)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def student_samples_ref(cfg: StudentSamplesConfig, topk: TopKConfig, teacher: dict, data: DataRef, student: str) -> CacheRef:
    """The address of a graded-samples cache: the sampling settings, the grading top-k (k, temperature),
    the teacher and tokenizer (:func:`teacher_cache_ref`), and ``student``, the sampling student's
    :func:`weights_fingerprint`. Not the batch sizes (they change only how the work is split) nor the
    policy (it chose the student, whose weights are in the address)."""
    if cfg.prompt_len >= data.seq_len:
        raise ConfigError(f"student_samples.prompt_len {cfg.prompt_len} must be below data.seq_len {data.seq_len}: "
                          "prompts are cut from train sequences.")
    settings = cfg.model_dump(exclude={"batch_size", "policy"})
    return teacher_cache_ref(KIND, {**settings, "soft_topk": topk.k, "soft_temperature": topk.temperature,
                                    "student_fingerprint": student}, teacher, data)


@dataclass
class Graded:
    """The teacher's grades of one completion of n tokens: ids [n, k] int64, logprobs [n, k] float32,
    tail_logprob [n] float32 (top-k at the grading temperature, as ``topk_targets_from_logits``), and
    token_logprobs [n] float32: the teacher's log p of each written token at temperature 1."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    token_logprobs: np.ndarray


@torch.inference_mode()
def grade(teacher: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], *, k: int, temperature: float,
          batch_size: int, pad_id: int) -> list[Graded]:
    """The teacher's top-k and token log-probabilities at every completion position of each sequence.

    Sequences (prompt + completion) are right-padded per batch of ``batch_size`` and scored in one
    forward each (causal attention: a position never sees the padding after it); the results come to
    the host once per batch. Returns one :class:`Graded` per (prompt, completion), in order."""
    device = next(teacher.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out: list[Graded] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [list(p) + list(c) for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])]
        length = max(map(len, seqs))
        input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        input_ids = input_ids.to(device)
        with autocast:
            logits = teacher(input_ids=input_ids).logits[:, :-1]
        targets = topk_targets_from_logits(logits, k, temperature)
        token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        ids, lps, tail, tok = (x.cpu().numpy() for x in (targets.ids, targets.logprobs, targets.tail_logprob, token_lp))
        for i, (p, c) in enumerate(zip(prompts[start : start + batch_size], completions[start : start + batch_size])):
            at = slice(len(p) - 1, len(p) - 1 + len(c))  # position t predicts token t+1
            out.append(Graded(ids[i, at].astype(np.int64), lps[i, at].astype(np.float32), tail[i, at].astype(np.float32),
                              tok[i, at].astype(np.float32)))
    return out


def student_samples_job(
    cfg: StudentSamplesConfig, topk: TopKConfig, teacher: dict, data: DataRef, student: str,
    load_student: Callable[[torch.device], torch.nn.Module],
) -> ShardJob:
    """The graded-samples stage as a ShardJob over the first ``cfg.num_prompts`` train sequences.

    ``student`` is the sampling student's weights fingerprint; ``load_student(device)`` returns that
    student (eval mode) on the teacher's device, called only when some shard is still to be computed."""
    ref = student_samples_ref(cfg, topk, teacher, data, student)
    ids_type = id_type(data.vocab_size)
    ids_np = ids_type.to_pandas_dtype()
    eos = teacher.get("eos_token_id")
    pad = eos if eos is not None else 0
    loaded: dict = {}

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, data_sha: str) -> pa.Table:
        device = next(model.parameters()).device
        if "student" not in loaded:
            loaded["student"] = load_student(device)
        prompts = prompts_of(input_ids, cfg.prompt_len)
        results = sample(
            loaded["student"], prompts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, eos_token_id=eos, pad_token_id=pad, seed=shard_seed(cfg.seed, data_sha),
            batch_size=cfg.batch_size,
        )
        graded = grade(model, [prompts[r.prompt_index] for r in results], [r.completion_ids for r in results],
                       k=topk.k, temperature=topk.temperature, batch_size=topk.batch_size, pad_id=pad)
        return pa.table({
            "prompt_id": pa.array([int(seq_ids[r.prompt_index]) for r in results], pa.int64()),
            "sample_idx": pa.array([r.sample_idx for r in results], pa.int32()),
            "prompt_ids": pa.array([np.asarray(prompts[r.prompt_index], ids_np) for r in results], pa.list_(ids_type)),
            "completion_ids": pa.array([np.asarray(r.completion_ids, ids_np) for r in results], pa.list_(ids_type)),
            # the student's own log p of each token it wrote (temperature 1) and the teacher's of the same token
            "token_logprobs": pa.array([np.asarray(r.token_logprobs, np.float32) for r in results], pa.list_(pa.float32())),
            "teacher_logprobs": pa.array([g.token_logprobs for g in graded], pa.list_(pa.float32())),
            "finish_reason": pa.array([r.finish_reason for r in results], pa.string()),
            **soft_columns([(g.ids, g.logprobs, g.tail_logprob) for g in graded], ids_type),
        })

    return ShardJob(ref=ref, rows=cfg.num_prompts, compute=compute)


def teacher_nll(storage, ref: CacheRef) -> dict[str, float]:
    """The teacher's mean NLL per token of the student's samples in a graded cache, and the tokens counted."""
    store = ref.open(storage)
    total, count = 0.0, 0
    for entry in store.shards:
        col = store.read_shard(entry.name, ("teacher_logprobs",))["teacher_logprobs"].combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        total, count = total - float(values.sum()), count + len(values)
    return {"teacher_nll": total / max(count, 1), "tokens": count}
