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
from distill_core.student import count_parameters


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

    return AutoModelForCausalLM.from_pretrained(storage.local_dir(folder), dtype=torch.float32).eval()


def held_out_prompts(storage: Storage, data: DataRef, count: int, prompt_len: int) -> list[list[int]]:
    """The first ``prompt_len`` tokens of the first ``count`` validation sequences."""
    prompts: list[list[int]] = []
    for _, _, input_ids in read_sequences(storage, data.validation):
        prompts += [row[:prompt_len].tolist() for row in input_ids[: count - len(prompts)]]
        if len(prompts) >= count:
            break
    return prompts


def evaluate_students(
    teacher_ref, students: dict[str, str], storage: Storage, data: DataRef, cfg: EvalConfig, device,
    *, generation: bool = False, selection: bool = False, beams=None,
) -> dict[str, dict]:
    """Load the teacher and each student folder, then :func:`evaluate` them on the validation split.

    ``generation`` adds sample metrics (teacher-scored NLL, distinct-n, example texts) for every model;
    ``selection`` adds beam-ranking metrics for each student, with ``beams`` (a BeamsConfig) giving
    the beam width and length penalty."""
    from distill_core.generation_metrics import sample_metrics, selection_metrics
    from distill_core.teacher.load import load_teacher

    teacher, tokenizer = load_teacher(teacher_ref, storage)
    models = {name: load_model(storage, folder) for name, folder in students.items()}
    metrics = evaluate(teacher, models, storage, data, cfg, device)
    if generation or selection:
        prompts = held_out_prompts(storage, data, cfg.prompts, min(cfg.prompt_len, data.seq_len - 1))
        ids = dict(eos_id=teacher_ref.eos_token_id, pad_id=tokenizer.pad_token_id)
        teacher, models = teacher.to(device), {n: m.to(device) for n, m in models.items()}
    if generation:
        for name, values in sample_metrics(teacher, models, prompts, max_new_tokens=cfg.max_new_tokens, seed=0,
                                           tokenizer=tokenizer, **ids).items():
            metrics[name].update(values)
    if selection:
        for name, values in selection_metrics(teacher, models, prompts, num_beams=beams.num_beams, max_new_tokens=cfg.max_new_tokens,
                                              length_penalty=beams.length_penalty, **ids).items():
            metrics[name].update(values)
    return metrics
