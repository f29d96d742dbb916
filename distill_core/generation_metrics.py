"""Metrics of what models write: teacher-scored NLL and diversity of samples (SeqKD), and how a
student ranks and reproduces the teacher's beam candidates (distilled beam search)."""

from __future__ import annotations

import numpy as np
import torch

from distill_core.batches import collate_beams, collate_samples
from distill_core.losses.sequence import length_normalised, sequence_logprob, token_cross_entropy
from distill_core.teacher.beam import beam_search
from distill_core.teacher.sample import sample


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams in ``sequences`` (1.0 = no n-gram repeats; 0 when none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a between two score vectors of one candidate list (ties count as discordant-free 0)."""
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return 0.0
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(s / len(pairs))


def token_f1(predicted: list[int], reference: list[int]) -> float:
    """Token-level F1 between two sequences, as bags of tokens (SQuAD-style overlap)."""
    if not predicted or not reference:
        return float(predicted == reference)
    common = sum(min(predicted.count(t), reference.count(t)) for t in set(predicted))
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def teacher_nll_per_prompt(teacher, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                           batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's summed NLL of each completion given its prompt, and its token count: two arrays
    [len(prompts)] float64 / int64 (0 and 0 for an empty completion)."""
    device = next(teacher.parameters()).device
    nll, tokens = np.zeros(len(prompts)), np.zeros(len(prompts), np.int64)
    kept = [i for i, c in enumerate(completions) if c]
    for start in range(0, len(kept), batch_size):
        at = kept[start : start + batch_size]
        batch = collate_samples([{"prompt_ids": np.asarray(prompts[i]), "completion_ids": np.asarray(completions[i])} for i in at],
                                pad_id).to(device)
        logits = teacher(input_ids=batch.input_ids).logits[:, :-1]
        ce = token_cross_entropy(logits, batch.input_ids[:, 1:], batch.loss_mask) * batch.loss_mask
        nll[at], tokens[at] = ce.sum(-1).double().cpu().numpy(), batch.loss_mask.sum(-1).cpu().numpy()
    return nll, tokens


def teacher_nll(teacher, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int = 8) -> float:
    """The teacher's mean per-token NLL of ``completions`` given their ``prompts`` (lower = more teacher-like)."""
    nll, tokens = teacher_nll_per_prompt(teacher, prompts, completions, pad_id, batch_size)
    return float(nll.sum() / max(tokens.sum(), 1))


def sample_metrics(teacher, models: dict, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                   pad_id: int, seed: int, tokenizer=None, examples: int = 3) -> dict[str, dict]:
    """Per model (the teacher included): teacher-scored NLL, distinct-1/2 and a few texts of its samples."""
    out = {}
    for name, model in {"teacher": teacher, **models}.items():
        results = sample(model, prompts, num_samples=1, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         pad_token_id=pad_id, seed=seed, batch_size=len(prompts))
        completions = [r.completion_ids for r in results]
        out[name] = {
            "teacher_nll": teacher_nll(teacher, prompts, completions, pad_id),
            "distinct_1": distinct_n(completions, 1),
            "distinct_2": distinct_n(completions, 2),
        }
        if tokenizer is not None:
            out[name]["examples"] = [tokenizer.decode(p + c) for p, c in zip(prompts[:examples], completions[:examples])]
    return out


@torch.inference_mode()
def selection_metrics(teacher, students: dict, prompts: list[list[int]], *, num_beams: int, max_new_tokens: int,
                      length_penalty: float, eos_id: int | None, pad_id: int) -> dict[str, dict]:
    """On fresh teacher beams: how often each student's top-scored candidate is the teacher's best,
    Kendall tau between student and teacher scores, and token F1 of the student's own best beam
    against the teacher's best candidate."""
    teacher_beams = beam_search(teacher, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, eos_token_id=eos_id, pad_token_id=pad_id, batch_size=len(prompts))
    rows = [{"prompt_ids": np.asarray(p), "candidates": [np.asarray(c.completion_ids) for c in cands],
             "scores": np.array([c.score for c in cands], np.float32)} for p, cands in zip(prompts, teacher_beams)]
    batch = collate_beams(rows, pad_id)
    out = {}
    for name, student in students.items():
        device = next(student.parameters()).device
        b = batch.to(device)
        logits = student(input_ids=b.input_ids).logits[:, :-1]
        sum_lp, n_tokens = sequence_logprob(logits, b.input_ids[:, 1:], b.loss_mask)
        scores = length_normalised(sum_lp, n_tokens, length_penalty).view_as(b.teacher_scores).float().cpu().numpy()
        teacher_scores = batch.teacher_scores.numpy()
        own = beam_search(student, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                          length_penalty=length_penalty, eos_token_id=eos_id, pad_token_id=pad_id, batch_size=len(prompts))
        out[name] = {
            "selection_agreement": float(np.mean(scores.argmax(1) == teacher_scores.argmax(1))),
            "kendall_tau": float(np.mean([kendall_tau(s, t) for s, t in zip(scores, teacher_scores)])),
            "beam_token_f1": float(np.mean([token_f1(o[0].completion_ids, t[0].completion_ids) for o, t in zip(own, teacher_beams)])),
        }
    return out
