"""Held-out metrics: perplexity of teacher and students, student↔teacher agreement and KL, size, speed."""

from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from distill_core.config import EvalConfig
from distill_core.data import DataRef, read_sequences
from distill_core.storage import Storage


def validation_batches(storage: Storage, data: DataRef, cfg: EvalConfig) -> Iterator[torch.Tensor]:
    """The first ``cfg.max_sequences`` validation sequences, int64 [b, T] batches, in a fixed order."""
    rows = []
    for _, _, input_ids in read_sequences(storage, data.validation):
        rows.append(input_ids)
        if sum(len(r) for r in rows) >= cfg.max_sequences:
            break
    all_rows = np.concatenate(rows)[: cfg.max_sequences]
    for start in range(0, len(all_rows), cfg.batch_size):
        yield torch.from_numpy(all_rows[start : start + cfg.batch_size])


@torch.inference_mode()
def compare(teacher, students: dict, batches: Iterator[torch.Tensor], device) -> dict[str, dict[str, float]]:
    """Perplexity of every model; top-1 agreement with and KL(teacher‖student) for each student.

    One teacher forward per batch serves every student. Returns {"teacher": {...}, name: {...}}.
    """
    nll = {name: 0.0 for name in ["teacher", *students]}
    agree = {name: 0.0 for name in students}
    kl = {name: 0.0 for name in students}
    count = 0
    for input_ids in batches:
        input_ids = input_ids.to(device)
        labels = input_ids[:, 1:]
        t_logp = F.log_softmax(teacher(input_ids=input_ids).logits[:, :-1].float(), -1)
        nll["teacher"] += -t_logp.gather(-1, labels[..., None]).sum().item()
        t_top1 = t_logp.argmax(-1)
        for name, student in students.items():
            s_logp = F.log_softmax(student(input_ids=input_ids).logits[:, :-1].float(), -1)
            nll[name] += -s_logp.gather(-1, labels[..., None]).sum().item()
            agree[name] += (s_logp.argmax(-1) == t_top1).sum().item()
            kl[name] += (t_logp.exp() * (t_logp - s_logp)).sum().item()
        count += labels.numel()
    out = {"teacher": {"val_ppl": math.exp(nll["teacher"] / count), "val_tokens": count}}
    for name in students:
        out[name] = {
            "val_ppl": math.exp(nll[name] / count),
            "top1_agreement": agree[name] / count,
            "kl_to_teacher": kl[name] / count,
        }
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def cpu_tokens_per_second(model, seq_len: int, tokens: int, vocab_size: int) -> float:
    """Forward throughput on the CPU for batch-1 sequences of ``seq_len`` (one warm-up pass)."""
    model = model.to("cpu").eval()
    ids = torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    passes = max(1, tokens // seq_len)
    t0 = time.perf_counter()
    for _ in range(passes):
        model(input_ids=ids)
    return passes * seq_len / (time.perf_counter() - t0)


def evaluate(teacher, students: dict, storage: Storage, data: DataRef, cfg: EvalConfig, device) -> dict[str, dict]:
    """Every metric of the report, keyed by model name ("teacher" and each student)."""
    metrics = compare(teacher.to(device).eval(), {n: m.to(device).eval() for n, m in students.items()},
                      validation_batches(storage, data, cfg), device)
    for name, model in [("teacher", teacher), *students.items()]:
        metrics[name]["params"] = count_parameters(model)
        metrics[name]["cpu_tokens_per_s"] = cpu_tokens_per_second(model, min(data.seq_len, 128), cfg.speed_tokens, data.vocab_size)
    return metrics


def load_model(storage: Storage, folder: str):
    """A causal LM saved in Hugging Face format under ``folder`` of the storage root."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(storage.local_dir(folder), torch_dtype=torch.float32).eval()


def evaluate_students(teacher_ref, students: dict[str, str], storage: Storage, data: DataRef, cfg: EvalConfig, device) -> dict[str, dict]:
    """Load the teacher and each student folder, then :func:`evaluate` them on the validation split."""
    from distill_core.teacher.load import load_teacher

    teacher, _ = load_teacher(teacher_ref, storage)
    models = {name: load_model(storage, folder) for name, folder in students.items()}
    return evaluate(teacher, models, storage, data, cfg, device)
