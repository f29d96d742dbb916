"""Teacher beam search for distilled beam search: every prompt's ``num_beams`` finished candidates with scores.

A hand-written batched beam search over the model's KV cache, following transformers'
``generate(num_beams=N, early_stopping=True)`` step for step:

* each step takes the best ``2N`` continuations of a prompt's ``N`` running beams by accumulated
  log-probability; those among the best ``N`` that end in EOS become finished candidates; the best
  ``N`` that do not end in EOS keep running;
* a prompt keeps its ``N`` best finished candidates (score = sum_logprob / n_tokens ** length_penalty,
  with n_tokens counting the EOS token) and is done once it holds ``N`` of them (early stopping);
* at ``max_new_tokens`` the best ``N`` continuations are all finished;
* the cache is reordered by parent beam each step (``Cache.reorder_cache``); the search exits when
  every prompt is done, and drops done prompts from the batch at each sync;
* optionally (``static_cache``) it decodes into a preallocated static cache of fixed shape, optionally
  compiled (``compile``: CUDA graphs on a GPU); done prompts then stay in the batch, and the reorder
  copies only the generated slots in place, since every beam of a prompt holds the same prompt.

Beams start from one prefill per prompt whose cache rows are repeated ``N`` times; as in
``generate``, only the first copy starts with score 0 (the others start at -1e9), so the first step
expands a single beam. Tokens and parent pointers stay on the device and are walked back on the host
once per batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from distill_core.teacher.decode import (
    CallSpec,
    StaticPlan,
    last_logits,
    length_buckets,
    model_device,
    start,
    validate_loop,
    validate_prompts,
)

__all__ = ["BeamCandidate", "beam_search"]

# The starting score of the repeated beams (generate uses the same value): finite so arithmetic
# stays finite, low enough that no real continuation loses to them.
_DEAD_BEAM = -1.0e9


@dataclass
class BeamCandidate:
    """One finished beam. ``completion_ids`` ends with EOS unless it ran to ``max_new_tokens``.

    sum_logprob: sum of the teacher's log-probabilities of ``completion_ids`` (temperature 1).
    n_tokens: len(completion_ids), EOS included.
    score: sum_logprob / n_tokens ** length_penalty (the ``sequences_scores`` of ``generate``).
    rank: 0 for the best score of its prompt.
    """

    rank: int
    completion_ids: list[int]
    sum_logprob: float
    n_tokens: int
    score: float


def beam_search(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int,
    sync_every: int = 4,
    static_cache: bool = False,
    compile: bool = False,
) -> list[list[BeamCandidate]]:
    """Beam-search ``prompts`` with ``model`` (eval mode, any device).

    Args:
        num_beams: beams per prompt, and finished candidates returned per prompt.
        length_penalty: exponent on the length in the score; > 0 favours longer candidates.
        eos_token_id: ends a candidate (None: every candidate runs ``max_new_tokens``).
        pad_token_id: fills the left padding; never attended to.
        batch_size: prompts per batch; a batch decodes ``batch_size * num_beams`` rows.
        sync_every: steps between the CPU syncs that check for done prompts.
        static_cache / compile: as for ``sample``: a fixed-shape static cache, and decode steps through
            ``torch.compile`` (CUDA graphs on a GPU). The candidates are the same.

    Returns:
        Per prompt, in prompt order, its ``num_beams`` candidates sorted best score first.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    validate_loop(sync_every, static_cache, compile)
    if not prompts:
        return []
    validate_prompts(prompts, max_new_tokens, model)
    spec = CallSpec(model)
    buckets = length_buckets([len(p) for p in prompts], batch_size)
    cache_len = max(len(p) for p in prompts) + max_new_tokens
    plan = StaticPlan(model, rows=len(buckets[0]) * num_beams, cache_len=cache_len, compile=compile) if static_cache else nullcontext()
    out: list[list[BeamCandidate] | None] = [None] * len(prompts)
    with torch.inference_mode(), plan as static:
        for idx in buckets:
            found = _beam_batch(
                model, spec, [prompts[i] for i in idx], num_beams, max_new_tokens, length_penalty,
                eos_token_id, pad_token_id, sync_every, static,
            )
            for i, candidates in zip(idx, found):
                out[i] = candidates
    return out  # type: ignore[return-value]


def _beam_batch(
    model: torch.nn.Module,
    spec: CallSpec,
    prompts: list[list[int]],
    n: int,
    steps: int,
    length_penalty: float,
    eos: int | None,
    pad_token_id: int,
    sync_every: int,
    static: StaticPlan | None,
) -> list[list[BeamCandidate]]:
    device = model_device(model)
    n_real = len(prompts)
    started = start(model, spec, prompts, n, steps, pad_token_id, static)
    width, cache, mask, positions = started.width, started.cache, started.mask, started.positions
    n_prompts = mask.shape[0] // n  # the static path pads the batch
    logprobs = torch.log_softmax(started.logits, dim=-1)  # [P*N, V]
    vocab = logprobs.shape[-1]
    if 2 * n > n * vocab:
        raise ValueError(f"num_beams={n} needs a vocabulary of at least 2 tokens")
    running = torch.full((n_prompts, n), _DEAD_BEAM, device=device)
    running[:, 0] = 0.0
    running = running.view(-1)

    # Finished candidates per prompt (all prompts of the batch, by prompt slot), best first.
    fin_score = torch.full((n_prompts, n), float("-inf"), device=device)
    fin_sum = torch.zeros((n_prompts, n), device=device)
    fin_valid = torch.zeros((n_prompts, n), dtype=torch.bool, device=device)
    fin_step = torch.zeros((n_prompts, n), dtype=torch.long, device=device)
    fin_row = torch.zeros((n_prompts, n), dtype=torch.long, device=device)  # parent row at fin_step
    fin_token = torch.zeros((n_prompts, n), dtype=torch.long, device=device)

    # Running beams after step t: token_hist[t][r] is the token of row r, parent_hist[t][r] its
    # row at step t (an index into token_hist[t - 1]). Rows shrink when done prompts are dropped.
    token_hist: list[torch.Tensor] = []
    parent_hist: list[torch.Tensor] = []
    active = torch.arange(n_prompts, device=device)  # prompt slot of each live prompt, in row order
    beam_offset = torch.arange(n_prompts, device=device)[:, None] * n
    top_n = torch.arange(2 * n, device=device) < n
    real = torch.arange(n_prompts, device=device) < n_real  # the static path's padding prompts are never open

    for t in range(steps):
        n_live = active.numel()
        total = (logprobs + running[:, None]).view(n_live, n * vocab)
        cand_sum, cand_index = total.topk(2 * n, dim=-1)  # [P_live, 2N], best first
        cand_row = cand_index // vocab + beam_offset[:n_live]
        cand_token = cand_index % vocab
        last = t == steps - 1
        if last:
            cand_ends = torch.ones_like(cand_token, dtype=torch.bool)
        elif eos is not None:
            cand_ends = cand_token == eos
        else:
            cand_ends = torch.zeros_like(cand_token, dtype=torch.bool)

        # Merge the new finished candidates (only the best N of the 2N, as generate does) into the
        # kept ones, unless the prompt already holds N (early stopping).
        was_full = fin_valid[active].all(dim=-1, keepdim=True)
        joins = cand_ends & top_n & ~was_full
        new_score = torch.where(joins, cand_sum / float(t + 1) ** length_penalty, float("-inf"))
        merged = [
            (torch.cat((fin_score[active], new_score), 1), fin_score),
            (torch.cat((fin_sum[active], cand_sum), 1), fin_sum),
            (torch.cat((fin_valid[active], joins), 1), fin_valid),
            (torch.cat((fin_step[active], torch.full_like(cand_token, t)), 1), fin_step),
            (torch.cat((fin_row[active], cand_row), 1), fin_row),
            (torch.cat((fin_token[active], cand_token), 1), fin_token),
        ]
        keep = merged[0][0].topk(n, dim=-1).indices
        for values, table in merged:
            table[active] = values.gather(1, keep)
        if last:
            break

        # The best N continuations that did not finish keep running.
        pick = cand_sum.masked_fill(cand_ends, float("-inf")).topk(n, dim=-1).indices
        running = cand_sum.gather(1, pick).view(-1)
        parents = cand_row.gather(1, pick).view(-1)
        tokens = cand_token.gather(1, pick).view(-1)

        if eos is not None and (t + 1) % sync_every == 0:
            open_prompts = ~fin_valid[active].all(dim=-1) & real[active]
            n_open = int(open_prompts.sum())  # CPU-GPU sync point, once every sync_every steps
            if n_open == 0:
                break
            if static is None and n_open < n_live:
                rows_kept = open_prompts.repeat_interleave(n)
                active = active[open_prompts]
                running, parents, tokens = running[rows_kept], parents[rows_kept], tokens[rows_kept]
        token_hist.append(tokens)
        parent_hist.append(parents)

        past = width + t
        if static is None:
            cache.reorder_cache(parents)
            mask, positions = mask[parents], positions[parents]
            logits = last_logits(model, spec, cache, tokens[:, None], mask[:, : past + 1], positions[:, None], past)
        else:
            # Parents stay within their prompt, whose rows share the mask and positions: only the
            # generated cache slots differ between beams.
            _reorder_generated(cache, parents, width, past)
            logits = static.decode(spec, tokens, mask, positions, past)
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = positions + 1

    return _walk_back(fin_score, fin_sum, fin_step, fin_row, fin_token, token_hist, parent_hist)[:n_real]


def _reorder_generated(cache, parents: torch.Tensor, first: int, end: int) -> None:
    """Give every row its parent beam's cache slots [first, end) (the generated tokens), in place, so
    the static cache keeps its tensors (a CUDA graph reads them by address). ``parents`` [rows]."""
    if end <= first:
        return
    for layer in cache.layers:
        layer.keys[:, :, first:end] = layer.keys[parents, :, first:end]
        layer.values[:, :, first:end] = layer.values[parents, :, first:end]


def _walk_back(fin_score, fin_sum, fin_step, fin_row, fin_token, token_hist, parent_hist) -> list[list[BeamCandidate]]:
    """Rebuild each finished candidate's tokens from the parent pointers, on the host."""
    # One device-to-host copy per tensor per batch.
    fin_score, fin_sum = fin_score.cpu().tolist(), fin_sum.cpu().tolist()
    fin_step, fin_row, fin_token = fin_step.cpu().tolist(), fin_row.cpu().tolist(), fin_token.cpu().tolist()
    tokens = [h.cpu().tolist() for h in token_hist]
    parents = [h.cpu().tolist() for h in parent_hist]
    found = []
    for p in range(len(fin_score)):
        candidates = []
        for rank in range(len(fin_score[p])):
            step, row = fin_step[p][rank], fin_row[p][rank]
            ids = [fin_token[p][rank]]
            for s in range(step - 1, -1, -1):
                ids.append(tokens[s][row])
                row = parents[s][row]
            ids.reverse()
            candidates.append(
                BeamCandidate(
                    rank=rank,
                    completion_ids=ids,
                    sum_logprob=fin_sum[p][rank],
                    n_tokens=len(ids),
                    score=fin_score[p][rank],
                )
            )
        found.append(candidates)
    return found
