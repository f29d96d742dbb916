"""The student shape under a parameter budget: enumerate, heal briefly, keep the best.

Candidates keep the requested KV groups and hidden width and vary depth with the MLP width that
lands nearest the budget (within ``tolerance``); a spread of them is healed for a few steps on
calibration sequences (0.5 forward KL to the teacher's full distribution + 0.5 CE, the same for
every student of a run) and scored by mean token cross-entropy on held-out calibration sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_core.pruning.arch import geometry
from distill_core.pruning.importance import Importance
from distill_core.pruning.slicing import Shape, choose_layers, plan_for, prune, student_config



def width_step(intermediate_size: int) -> int:
    """MLP widths searched are multiples of this (a multiple of 8 near 1/48 of the teacher's, e.g. 32 for 1536)."""
    return max(8, intermediate_size // 48 // 8 * 8)


@dataclass(frozen=True)
class Candidate:
    layers: int
    intermediate_size: int
    params: int


def count_params(config) -> int:
    """Parameters of a causal LM built from ``config`` (tied tensors once), counted without allocating."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def shape_params(teacher_config, layers: int, intermediate_size: int, num_kv_heads: int, hidden_size: int) -> int:
    """Parameters of the student of this shape (layer identity does not change the count)."""
    return count_params(student_config(teacher_config, Shape(tuple(range(layers)), intermediate_size, num_kv_heads, hidden_size)))


def candidates(teacher_config, target: int, num_kv_heads: int, hidden_size: int, tolerance: float = 0.03) -> list[Candidate]:
    """Every depth with an MLP width (a multiple of :func:`width_step`, or the teacher's) whose student is
    within ``tolerance`` of ``target`` parameters, the width nearest the budget for each depth."""
    geo = geometry(teacher_config)
    # The count is affine in depth and, per layer, in MLP width: measure it at two points of each.
    p = lambda n, i: shape_params(teacher_config, n, i, num_kv_heads, hidden_size)  # noqa: E731
    step = width_step(geo.intermediate_size)
    lo, hi = step, geo.intermediate_size
    p11, p1h, p21 = p(1, lo), p(1, hi), p(2, lo)
    per_layer, per_neuron = p21 - p11, (p1h - p11) // (hi - lo)  # exact: each neuron adds the same weights
    base = p11 - per_layer
    count = lambda n, i: base + n * (per_layer + per_neuron * (i - lo))  # noqa: E731
    found = []
    for n in range(1, geo.num_layers + 1):
        width = (target - base - n * per_layer) / (n * per_neuron) + lo
        options = {geo.intermediate_size, *(step * k for k in (math.floor(width / step), math.ceil(width / step)))}
        options = [i for i in options if step <= i <= geo.intermediate_size]
        if not options:
            continue
        best = min(options, key=lambda i: abs(count(n, i) - target))
        params = count(n, best)
        if abs(params - target) <= tolerance * target:
            found.append(Candidate(n, best, params))
    return found


def spread(found: list[Candidate], count: int) -> list[Candidate]:
    """``count`` candidates evenly spaced over the depths found (all of them when fewer)."""
    if len(found) <= count:
        return list(found)
    return [found[round(k * (len(found) - 1) / (count - 1))] for k in range(count)] if count > 1 else [found[len(found) // 2]]


def heal_and_score(
    teacher: nn.Module, student: nn.Module, heal_ids: torch.Tensor, held_ids: torch.Tensor, *, steps: int, lr: float,
    batch_size: int, seed: int,
) -> float:
    """Train ``student`` ``steps`` AdamW steps on ``heal_ids`` ``[N, T]`` (0.5 forward KL to ``teacher`` +
    0.5 CE, linear warm-up over the first fifth), then its mean token CE on ``held_ids`` ``[M, T]``."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 5)
    student.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        start = (step * batch_size) % heal_ids.shape[0]
        ids = heal_ids[start : start + batch_size]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        s_logp = F.log_softmax(student(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        ce = F.nll_loss(s_logp.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (0.5 * kl + 0.5 * ce).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, held_ids.shape[0], batch_size):
            ids = held_ids[start : start + batch_size]
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return total / count


def search(
    teacher: nn.Module, importance: Importance, found: list[Candidate], num_kv_heads: int, hidden_size: int,
    heal_ids: torch.Tensor, held_ids: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
) -> tuple[Shape, list[dict]]:
    """Heal every candidate from its importance-pruned init; the best shape and each candidate's record."""
    records, best = [], None
    for cand in found:
        shape = Shape(choose_layers(importance.block_influence, cand.layers), cand.intermediate_size, num_kv_heads, hidden_size)
        student = prune(teacher, plan_for(importance, shape))
        loss = heal_and_score(teacher, student, heal_ids, held_ids, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        records.append({"layers": cand.layers, "intermediate_size": cand.intermediate_size, "params": cand.params,
                        "held_out_loss": round(loss, 6)})
        if best is None or loss < best[0]:
            best = (loss, shape)
        del student
    return best[1], records
