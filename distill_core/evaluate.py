"""Held-out metrics: perplexity of teacher and students with bootstrap intervals and paired comparisons,
student↔teacher agreement and KL, calibration (expected calibration error), size, speed."""

from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from distill_core.config import EvalConfig
from distill_core.data import DataRef, read_sequences
from distill_core.errors import ConfigError, DataError
from distill_core.intervals import (
    LEVEL, RESAMPLES, Interval, PairedComparison, calibration_difference, calibration_interval, gap_closed, paired_comparison,
    perplexity_interval,
)
from distill_core.storage import Storage
from distill_core.student import count_parameters
from distill_core.train import body_and_head


def validation_batches(storage: Storage, data: DataRef, cfg: EvalConfig) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The first ``cfg.max_sequences`` validation sequences in a fixed order, in batches of
    (seq_ids int64 [b], input_ids int64 [b, T])."""
    ids, rows = [], []
    for _, seq_ids, input_ids in read_sequences(storage, data.validation):
        ids.append(seq_ids)
        rows.append(input_ids)
        if sum(len(r) for r in rows) >= cfg.max_sequences:
            break
    all_ids, all_rows = np.concatenate(ids)[: cfg.max_sequences], np.concatenate(rows)[: cfg.max_sequences]
    for start in range(0, len(all_rows), cfg.batch_size):
        yield all_ids[start : start + cfg.batch_size], torch.from_numpy(all_rows[start : start + cfg.batch_size])


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error


def calibration_bins(logprobs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS,
                     groups: torch.Tensor | None = None, n_groups: int = 1) -> torch.Tensor:
    """Per-bin sums for the top-label expected calibration error of next-token predictions.

    logprobs: [N, V] float, each position's log-probabilities; labels: [N] int64, the true next tokens.
    A position's confidence is its largest probability, and it is correct when that token (the argmax)
    is the label; positions go to ``bins`` equal-width bins of confidence over [0, 1] (the top bin
    closed). Returns float64 [3, bins]: per bin the count, the summed confidence and the number
    correct; with ``groups`` (int64 [N] in [0, n_groups), e.g. each position's sequence) float64
    [n_groups, 3, bins], each group's own sums. Sums over chunks add up, so a caller accumulates them
    and calls :func:`expected_calibration_error` once.
    """
    assert logprobs.dim() == 2 and labels.shape == logprobs.shape[:1], (
        f"logprobs must be [N, V] and labels [N], got {tuple(logprobs.shape)} and {tuple(labels.shape)}"
    )
    top, pred = logprobs.max(-1)
    confidence = top.double().exp()
    which = (confidence * bins).long().clamp_(0, bins - 1)
    if groups is not None:
        which = which + groups * bins
    out = torch.zeros(3, n_groups * bins, dtype=torch.float64, device=logprobs.device)
    out[0].index_add_(0, which, torch.ones_like(confidence))
    out[1].index_add_(0, which, confidence)
    out[2].index_add_(0, which, (pred == labels).double())
    return out.view(3, n_groups, bins).transpose(0, 1) if groups is not None else out


def expected_calibration_error(stats: torch.Tensor) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| from :func:`calibration_bins`' sums [3, bins].

    In [0, 1]; 0 when, in every bin, the share of correct predictions equals their mean confidence."""
    assert stats.dim() == 2 and stats.shape[0] == 3, f"stats must be [3, bins], got {tuple(stats.shape)}"
    count, confidence, correct = stats.double()
    total = count.sum()
    assert total > 0, "expected_calibration_error needs at least one position"
    return float((confidence - correct).abs().sum() / total)  # n_b · |acc_b − conf_b| = |Σ correct − Σ confidence|


@torch.inference_mode()
def compare(teacher, students: dict, batches: Iterator[tuple[np.ndarray, torch.Tensor]], device,
            *, chunk_rows: int | None = None) -> dict[str, dict]:
    """Perplexity and expected calibration error (``ece``, :func:`expected_calibration_error`) of every
    model; top-1 agreement with and KL(teacher‖student) for each student.

    ``batches`` yield (seq_ids [b], input_ids [b, T]). One teacher forward per batch serves every
    student, so all models are scored on the same sequences. ``chunk_rows`` (``evaluate.chunk_rows``):
    every model runs only its body and the metrics come from its LM head ``chunk_rows`` positions at a
    time, so no [b·T, V] logits exist (None: the models' own full logits; the values are the same).
    Returns {"teacher": {...}, name: {...}}; each entry's "per_sequence" holds the summed NLL of every
    sequence (see :func:`per_sequence`) and its calibration sums [3, bins] (``calibration``, for the
    ECE's interval).
    """
    names = ["teacher", *students]
    seq_nll = {name: [] for name in names}
    seq_ids, seq_tokens = [], []
    agree = {name: 0.0 for name in students}
    kl = {name: 0.0 for name in students}
    calibration = {name: [] for name in names}  # per batch: float64 [b, 3, bins]
    for ids, input_ids in batches:
        input_ids = input_ids.to(device)
        labels = input_ids[:, 1:].reshape(-1)
        with torch.no_grad():
            logits = {name: _row_logits(model, input_ids, chunk_rows) for name, model in [("teacher", teacher), *students.items()]}
            nll = {name: torch.zeros(labels.numel(), dtype=torch.float64, device=device) for name in names}
            bins = {name: torch.zeros(len(input_ids), 3, ECE_BINS, dtype=torch.float64, device=device) for name in names}
            rows = labels.numel() if chunk_rows is None else chunk_rows
            for start in range(0, labels.numel(), rows):
                end = min(start + rows, labels.numel())
                y = labels[start:end, None]
                seq = torch.arange(start, end, device=device) // (input_ids.shape[1] - 1)
                t_logp = F.log_softmax(logits["teacher"](start, end).float(), -1)
                nll["teacher"][start:end] = -t_logp.gather(-1, y)[:, 0].double()
                bins["teacher"] += calibration_bins(t_logp, y[:, 0], groups=seq, n_groups=len(input_ids))
                t_top1 = t_logp.argmax(-1)
                for name in students:
                    s_logp = F.log_softmax(logits[name](start, end).float(), -1)
                    nll[name][start:end] = -s_logp.gather(-1, y)[:, 0].double()
                    bins[name] += calibration_bins(s_logp, y[:, 0], groups=seq, n_groups=len(input_ids))
                    agree[name] += (s_logp.argmax(-1) == t_top1).sum().item()
                    kl[name] += (t_logp.exp() * (t_logp - s_logp)).sum().item()
        for name in names:
            seq_nll[name].append(nll[name].view(len(input_ids), -1).sum(-1).cpu())
            calibration[name].append(bins[name].cpu())
        seq_ids += np.asarray(ids).tolist()
        seq_tokens += [input_ids.shape[1] - 1] * len(input_ids)  # every packed position has a next token
    count = sum(seq_tokens)
    out = {}
    for name in names:
        nll = torch.cat(seq_nll[name]).numpy()
        stats = torch.cat(calibration[name])
        out[name] = {
            "val_ppl": math.exp(float(nll.sum()) / count),
            "ece": expected_calibration_error(stats.sum(0)),
            "per_sequence": {"seq_id": seq_ids, "nll": nll.tolist(), "tokens": seq_tokens, "calibration": stats.tolist()},
        }
    out["teacher"].update(val_tokens=count, val_sequences=len(seq_ids))
    for name in students:
        out[name].update(top1_agreement=agree[name] / count, kl_to_teacher=kl[name] / count)
    return out


def _row_logits(model, input_ids: torch.Tensor, chunk_rows: int | None):
    """``rows(start, end)`` -> the model's next-token logits [end - start, V] at flattened positions
    start..end of input_ids[:, :-1]: from its full logits when ``chunk_rows`` is None, else from its
    final hidden states through its LM head, one slice at a time."""
    if chunk_rows is None:
        full = model(input_ids=input_ids).logits[:, :-1]
        full = full.reshape(-1, full.shape[-1])
        return lambda start, end: full[start:end]
    hidden, weight, bias = body_and_head(model, input_ids, setting="evaluate.chunk_rows")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return lambda start, end: F.linear(hidden[start:end], weight, bias)


def per_sequence(scored: dict) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(seq_ids, nll float64 [n], tokens int64 [n]) of one model's metrics from :func:`compare`."""
    if "per_sequence" not in scored:
        raise DataError(
            f"these metrics have no per-sequence NLL (keys: {sorted(scored)}); they come from an evaluation "
            "made before intervals existed: rerun the evaluate stage."
        )
    seq = scored["per_sequence"]
    return list(seq["seq_id"]), np.asarray(seq["nll"], np.float64), np.asarray(seq["tokens"], np.int64)


def paired(a: dict, b: dict, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> PairedComparison:
    """Model a against model b (their metrics from :func:`compare`), paired over the sequences both
    were scored on; ``.ratio`` is ppl_a / ppl_b with its interval. Refuses models scored on different
    sequences."""
    (nll_a, nll_b), tokens = _same_sequences(a, b)
    return paired_comparison(nll_a, nll_b, tokens, resamples=resamples, seed=seed, level=level)


def add_intervals(metrics: dict[str, dict], *, baseline: str | None = "baseline", resamples: int = RESAMPLES,
                  seed: int = 0, level: float = LEVEL) -> dict[str, dict]:
    """``metrics`` (from :func:`compare`) with bootstrap intervals over the validation sequences:

    - every model: ``val_ppl_low``, ``val_ppl_high`` (bounds of ``val_ppl``);
    - every student: ``ppl_ratio_vs_teacher`` (ppl / teacher ppl) with ``_low`` / ``_high``;
    - every student other than ``baseline``, when the baseline was scored: ``ppl_ratio_vs_baseline``
      with ``_low`` / ``_high`` (below 1: better than the CE-only baseline), and ``kd_gap_closed``
      with ``_low`` / ``_high`` (share of the baseline-to-teacher gap in log perplexity the student
      closes, see :func:`distill_core.intervals.gap_closed`; None when the teacher is not clearly
      better than the baseline);
    - where the metrics hold per-sequence calibration sums: ``ece_low`` / ``ece_high`` for every model,
      and ``ece_vs_baseline`` (student ECE − baseline ECE, below 0: better calibrated) with ``_low`` /
      ``_high``.

    Comparisons are paired and use the same ``seed``, so every interval comes from the same resamples."""
    kw = dict(resamples=resamples, seed=seed, level=level)
    out = {name: dict(m) for name, m in metrics.items()}
    teacher = metrics["teacher"]
    calibration = {name: _calibration(m) for name, m in metrics.items()}
    for name, m in metrics.items():
        _, nll, tokens = per_sequence(m)
        ci = perplexity_interval(nll, tokens, **kw)
        out[name].update(val_ppl=ci.estimate, val_ppl_low=ci.low, val_ppl_high=ci.high)  # the same exp(sum nll / sum tokens)
        if calibration[name] is not None:
            ece = calibration_interval(calibration[name], **kw)
            out[name].update(ece=ece.estimate, ece_low=ece.low, ece_high=ece.high)
        if name == "teacher":
            continue
        out[name].update(_flat("ppl_ratio_vs_teacher", paired(m, teacher, **kw).ratio))
        if baseline in metrics and name != baseline:
            out[name].update(_flat("ppl_ratio_vs_baseline", paired(m, metrics[baseline], **kw).ratio))
            (nll_s, nll_b, nll_t), tokens = _same_sequences(m, metrics[baseline], teacher)
            out[name].update(_flat("kd_gap_closed", gap_closed(nll_s, nll_b, nll_t, tokens, **kw)))
            if calibration[name] is not None and calibration[baseline] is not None:
                out[name].update(_flat("ece_vs_baseline", calibration_difference(calibration[name], calibration[baseline], **kw)))
    return out


def _calibration(scored: dict) -> np.ndarray | None:
    """A model's per-sequence calibration sums float64 [n, 3, bins], or None in metrics made before they were kept."""
    stats = scored.get("per_sequence", {}).get("calibration")
    return None if stats is None else np.asarray(stats, np.float64)


def _same_sequences(first: dict, *others: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """([nll [n] of each model], tokens [n]) of models scored on the same sequences, in one order."""
    ids, nll, tokens = per_sequence(first)
    nlls = [nll]
    for other in others:
        other_ids, other_nll, other_tokens = per_sequence(other)
        if other_ids != ids or not np.array_equal(other_tokens, tokens):
            raise DataError(
                f"models were scored on different validation sequences ({len(ids)} vs {len(other_ids)}, or other "
                "ids or lengths); a paired comparison needs them scored on the same sequences: evaluate them in one "
                "call, or with the same data and eval settings."
            )
        nlls.append(other_nll)
    return nlls, tokens


def _flat(key: str, ci: Interval | None) -> dict[str, float | None]:
    if ci is None:
        return {key: None, f"{key}_low": None, f"{key}_high": None}
    return {key: ci.estimate, f"{key}_low": ci.low, f"{key}_high": ci.high}


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


def evaluate(teacher, students: dict, storage: Storage, data: DataRef, cfg: EvalConfig, device,
             *, baseline: str | None = "baseline") -> dict[str, dict]:
    """Every metric of the report, keyed by model name ("teacher" and each student), with intervals
    (see :func:`add_intervals`; ``baseline`` names the CE-only student the others are compared with)."""
    metrics = compare(teacher.to(device).eval(), {n: m.to(device).eval() for n, m in students.items()},
                      validation_batches(storage, data, cfg), device, chunk_rows=cfg.chunk_rows)
    metrics = add_intervals(metrics, baseline=baseline, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
    for name, model in [("teacher", teacher), *students.items()]:
        metrics[name]["params"] = count_parameters(model)
        metrics[name]["cpu_tokens_per_s"] = cpu_tokens_per_second(model, min(data.seq_len, 128), cfg.speed_tokens, data.vocab_size)
    return metrics


@torch.inference_mode()
def compare_per_byte(teacher, students: dict, batches: Iterator[tuple[np.ndarray, torch.Tensor]], device, retokenizers: dict) -> dict[str, dict]:
    """Every model's NLL of the same validation text per byte, for students with their own tokenizers.

    ``retokenizers`` maps a student name to its :class:`distill_core.retokenize.Retokenizer` (students
    not in it share the teacher's tokens). Each model predicts its own tokens of each sequence; the
    "tokens" of every per-sequence entry are the bytes of the text the teacher predicts (its tokens 1..T-1),
    the same for every model, so ``val_ppl`` (exp of the NLL per byte) and its paired intervals compare
    across tokenizers; ``val_bpb`` is its log2. A student's first token spans other bytes than the
    teacher's, so the models predict nearly, not exactly, the same bytes. Top-1 agreement and KL
    need a shared vocabulary: None for the others.
    """
    names = ["teacher", *students]
    seq_nll = {name: [] for name in names}
    seq_ids, seq_bytes = [], []
    for ids, input_ids in batches:
        input_ids = input_ids.to(device).long()
        lengths = torch.from_numpy(next(iter(retokenizers.values())).t_len).to(device)
        seq_bytes += lengths[input_ids[:, 1:]].sum(-1).tolist()
        for name, model in [("teacher", teacher), *students.items()]:
            if name in retokenizers:
                rows = retokenizers[name].rows(list(input_ids.cpu().numpy()))
                width = max(max(len(r.ids) for r in rows), 2)
                x = torch.full((len(rows), width), 0, dtype=torch.long)
                mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
                for i, r in enumerate(rows):
                    x[i, : len(r.ids)] = torch.from_numpy(r.ids)
                    mask[i, : len(r.ids) - 1] = True
                x, mask = x.to(device), mask.to(device)
            else:
                x, mask = input_ids, torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
            logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0].double()
            seq_nll[name].append(torch.where(mask, nll, 0.0).sum(-1).cpu())
        seq_ids += np.asarray(ids).tolist()
    out = {}
    for name in names:
        nll = torch.cat(seq_nll[name]).numpy()
        out[name] = {"val_ppl": math.exp(float(nll.sum()) / sum(seq_bytes)), "unit": "byte",
                     "per_sequence": {"seq_id": seq_ids, "nll": nll.tolist(), "tokens": seq_bytes}}
        if name != "teacher":
            out[name].update(top1_agreement=None, kl_to_teacher=None)
    out["teacher"].update(val_tokens=sum(seq_bytes), val_sequences=len(seq_ids))
    return out


def with_bits_per_byte(metrics: dict[str, dict]) -> dict[str, dict]:
    """``val_bpb`` (with ``_low`` / ``_high``) from per-byte ``val_ppl``: log2 of it."""
    for m in metrics.values():
        for suffix in ("", "_low", "_high"):
            if m.get(f"val_ppl{suffix}") is not None:
                m[f"val_bpb{suffix}"] = math.log2(m[f"val_ppl{suffix}"])
    return metrics


def own_tokenizer(storage: Storage, folder: str, teacher_tokenizer):
    """The tokenizer saved with the student in ``folder`` when it is not the teacher's, else None."""
    from transformers import AutoTokenizer

    from distill_core.teacher.load import tokenizer_hash

    try:
        tokenizer = AutoTokenizer.from_pretrained(storage.local_dir(folder))
    except (OSError, ValueError):
        return None
    return None if tokenizer_hash(tokenizer) == tokenizer_hash(teacher_tokenizer) else tokenizer


def evaluate_across_tokenizers(teacher, teacher_tokenizer, models: dict, own: dict, storage: Storage, data: DataRef, cfg: EvalConfig,
                               device, *, baseline: str | None = "baseline") -> dict[str, dict]:
    """:func:`evaluate` when some students (``own``: name -> tokenizer) have their own tokenizers: every
    model scored per byte (:func:`compare_per_byte`), with the same paired intervals and ``val_bpb``."""
    from distill_core.retokenize import Retokenizer

    retok = {name: Retokenizer(teacher_tokenizer, tok) for name, tok in own.items()}
    metrics = compare_per_byte(teacher.to(device).eval(), {n: m.to(device).eval() for n, m in models.items()},
                               validation_batches(storage, data, cfg), device, retok)
    metrics = with_bits_per_byte(add_intervals(metrics, baseline=baseline, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed))
    for name, model in [("teacher", teacher), *models.items()]:
        metrics[name]["params"] = count_parameters(model)
        metrics[name]["cpu_tokens_per_s"] = cpu_tokens_per_second(model, min(data.seq_len, 128), cfg.speed_tokens, int(model.config.vocab_size))
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
    *, generation: bool = False, selection: bool = False, beams=None, baseline: str | None = "baseline",
) -> dict[str, dict]:
    """Load the teacher and each student folder, then :func:`evaluate` them on the validation split
    (``baseline``: the CE-only student the others are compared with).

    ``generation`` adds sample metrics (teacher-scored NLL, distinct-n, example texts) for every model;
    ``selection`` adds beam-ranking metrics for each student, with ``beams`` (a BeamsConfig) giving
    the beam width and length penalty."""
    from distill_core.generation_metrics import sample_metrics, selection_metrics
    from distill_core.teacher.load import load_teacher

    teacher, tokenizer = load_teacher(teacher_ref, storage)
    models = {name: load_model(storage, folder) for name, folder in students.items()}
    own = {name: tok for name, folder in students.items() if (tok := own_tokenizer(storage, folder, tokenizer)) is not None}
    if own:
        if generation or selection:
            raise ConfigError(
                f"students {sorted(own)} have their own tokenizers, and the generation and selection metrics compare token "
                "ids with the teacher's: set eval.generation and eval.selection to 'off'."
            )
        return evaluate_across_tokenizers(teacher, tokenizer, models, own, storage, data, cfg, device, baseline=baseline)
    metrics = evaluate(teacher, models, storage, data, cfg, device, baseline=baseline)
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
