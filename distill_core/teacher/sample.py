"""Teacher sampling for sequence-level KD: completions, their teacher logprobs, optional soft top-k.

A hand-written decode loop over the model's KV cache (not ``model.generate``):

* prompts are bucketed by length and left-padded (``decode.length_buckets`` / ``decode.left_pad``);
* each prompt is prefilled once, then its cache rows are repeated ``num_samples`` times;
* one token per step; a row that emits EOS is finished (it is fed pads and its outputs are masked);
* every ``sync_every`` steps one CPU sync checks whether all rows are finished (early exit) and, in
  the default dynamic-cache path, drops finished rows from the batch once enough have finished;
* sampled ids, their logprobs and the top-k stay on the device in preallocated [rows, steps]
  tensors and go to the host once per batch; no full-vocabulary tensor leaves the device.

``token_logprobs`` are the teacher's log-probabilities of the sampled tokens under its *unmodified*
distribution (temperature 1, no top-k/top-p filtering), not under the sampling proposal. Sequence-
level KD weights and filters sequences by how likely the teacher finds them; that quantity must not
change when the decoding knobs do, and it matches a plain teacher forward over prompt + completion.

Reproducibility: each batch draws from its own ``torch.Generator`` on the model's device, seeded from
(seed, batch index); the same seed, prompts and batch size give the same outputs, whatever
``sync_every`` or the cache kind. Sampled outputs depend on ``batch_size`` (it changes which prompts
share a generator); greedy settings (``top_k=1`` or ``temperature=0``) do not.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.teacher.decode import (
    CallSpec,
    StaticPlan,
    batch_generator,
    last_logits,
    length_buckets,
    model_device,
    start,
    validate_loop,
    validate_prompts,
)

__all__ = ["SampleResult", "sample"]

# Drop finished rows from the batch (dynamic cache only) once at least this share has finished:
# compaction copies the whole KV cache once, about the cost of one decode step's attention.
_COMPACT_SHARE = 0.25


@dataclass
class SampleResult:
    """One sampled completion of one prompt.

    completion_ids: new tokens, ending with EOS when ``finish_reason == "eos"``.
    token_logprobs: teacher log p(token) at temperature 1 without filtering, one per completion token.
    topk_ids [n, k] int64 / topk_logprobs [n, k] float32 / tail_logprob [n] float32 (CPU tensors, only
    when ``soft_topk > 0``): row i is the teacher's top-k at ``soft_temperature`` at the position that
    predicts completion token i, and the log mass outside those ids (``topk_targets_from_logits``).
    """

    prompt_index: int
    sample_idx: int
    completion_ids: list[int]
    token_logprobs: list[float]
    finish_reason: Literal["eos", "length"]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None


def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None,
    pad_token_id: int,
    seed: int,
    batch_size: int,
    soft_topk: int = 0,
    soft_temperature: float = 1.0,
    sync_every: int = 8,
    static_cache: bool = False,
    compile: bool = False,
) -> list[SampleResult]:
    """Sample ``num_samples`` completions per prompt from ``model`` (eval mode, any device).

    Args:
        prompts: token ids per prompt (each non-empty).
        temperature / top_k / top_p: the sampling distribution, applied in that order as
            ``generate`` does. ``top_k=1`` or ``temperature=0`` decode greedily (argmax).
        eos_token_id: a row that samples it is finished (None: every row runs ``max_new_tokens``).
        pad_token_id: fills the left padding; never attended to.
        batch_size: prompts per batch; a batch decodes ``batch_size * num_samples`` rows together.
        soft_topk / soft_temperature: also return the teacher's top-k at each completion position,
            from the same forward passes.
        sync_every: steps between the CPU syncs that check for an all-finished batch.
        static_cache: decode into a preallocated ``StaticCache`` with fixed shapes (every batch padded
            to the same rows and cache length; finished rows are kept, not dropped).
        compile: with ``static_cache``, run decode steps through ``torch.compile`` (CUDA graphs via
            mode "reduce-overhead" on CUDA, the default mode elsewhere). Prefill stays eager.

    Returns:
        One ``SampleResult`` per (prompt, sample), ordered by prompt index, then sample index.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or soft_topk < 0:
        raise ValueError(f"top_k and soft_topk must be >= 0, got {top_k} and {soft_topk}")
    if soft_temperature <= 0:
        raise ValueError(f"soft_temperature must be > 0, got {soft_temperature}")
    validate_loop(sync_every, static_cache, compile)
    if not prompts:
        return []
    validate_prompts(prompts, max_new_tokens, model)

    device = model_device(model)
    spec = CallSpec(model)
    buckets = length_buckets([len(p) for p in prompts], batch_size)
    knobs = _Knobs(temperature, top_k, top_p, eos_token_id, pad_token_id, soft_topk, soft_temperature, sync_every)
    # One cache shape for every batch: most rows and the longest prompt plus the new tokens.
    plan = StaticPlan(
        model, rows=len(buckets[0]) * num_samples, cache_len=max(len(p) for p in prompts) + max_new_tokens, compile=compile,
    ) if static_cache else nullcontext()

    results: list[SampleResult] = []
    with torch.inference_mode(), plan as static:
        for b, idx in enumerate(buckets):
            gen = batch_generator(device, seed, b)
            batch = [prompts[i] for i in idx]
            results.extend(_sample_batch(model, spec, batch, idx, num_samples, max_new_tokens, knobs, gen, static))
    results.sort(key=lambda r: (r.prompt_index, r.sample_idx))
    return results


@dataclass(frozen=True)
class _Knobs:
    temperature: float
    top_k: int
    top_p: float
    eos_token_id: int | None
    pad_token_id: int
    soft_topk: int
    soft_temperature: float
    sync_every: int


def _next_tokens(
    logits: torch.Tensor, knobs: _Knobs, gen: torch.Generator, n_draw: int, live: torch.Tensor | None
) -> torch.Tensor:
    """Draw one token per row from float32 ``logits`` [R, V] -> int64 [R], on the device, no sync.

    The noise is drawn for the batch's ``n_draw`` real rows every step, then indexed by ``live``
    (the rows still decoding) or padded for the static path's dummy rows: a row's draws do not depend
    on which other rows have finished, so dropping finished rows, ``sync_every`` and the cache kind
    never change a sample.
    """
    if knobs.temperature == 0 or knobs.top_k == 1:
        return logits.argmax(dim=-1)
    scores = logits / knobs.temperature if knobs.temperature != 1.0 else logits
    if knobs.top_k > 0:
        kth = scores.topk(min(knobs.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if knobs.top_p < 1.0:
        # As transformers' TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p,
        # always keeping the most likely token.
        sorted_scores, order = scores.sort(dim=-1)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - knobs.top_p)
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    # Gumbel-max: argmax(scores - log E), E ~ Exp(1), draws from softmax(scores) without a
    # softmax or the host round trip of torch.multinomial's checks.
    noise = torch.empty((n_draw, scores.shape[-1]), dtype=scores.dtype, device=scores.device)
    noise = noise.exponential_(generator=gen).clamp_min_(torch.finfo(scores.dtype).tiny).log_()
    if live is not None:
        noise = noise[live]
    elif n_draw < scores.shape[0]:
        noise = torch.cat((noise, noise.new_zeros(scores.shape[0] - n_draw, scores.shape[-1])))
    return (scores - noise).argmax(dim=-1)


def _sample_batch(
    model: torch.nn.Module,
    spec: CallSpec,
    prompts: list[list[int]],
    prompt_indices: list[int],
    num_samples: int,
    max_new_tokens: int,
    knobs: _Knobs,
    gen: torch.Generator,
    static: StaticPlan | None,
) -> list[SampleResult]:
    device = model_device(model)
    n_prompts, steps, eos = len(prompts), max_new_tokens, knobs.eos_token_id
    started = start(model, spec, prompts, num_samples, steps, knobs.pad_token_id, static)
    width, cache, logits, mask, positions = started.width, started.cache, started.logits, started.mask, started.positions
    rows = mask.shape[0]

    # Outputs, indexed by original row; `live` maps the batch's current rows to original rows.
    out_ids = torch.full((rows, steps), knobs.pad_token_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)
    lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    finished[n_prompts * num_samples :] = True  # the static path's dummy rows never hold up an exit
    if knobs.soft_topk:
        k = min(knobs.soft_topk, logits.shape[-1])
        out_topk_ids = torch.zeros((rows, steps, k), dtype=torch.long, device=device)
        out_topk_lp = torch.zeros((rows, steps, k), dtype=torch.float32, device=device)
        out_tail = torch.zeros((rows, steps), dtype=torch.float32, device=device)
    live = torch.arange(rows, device=device)
    all_rows = True  # live == arange(rows): write with slices instead of index_put

    for t in range(steps):
        tokens = _next_tokens(logits, knobs, gen, n_prompts * num_samples, None if all_rows else live)
        logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        was_finished = finished if all_rows else finished[live]
        tokens = tokens.masked_fill(was_finished, knobs.pad_token_id)
        logprobs = logprobs.masked_fill(was_finished, 0.0)
        if all_rows:
            out_ids[:, t], out_logprobs[:, t] = tokens, logprobs
        else:
            out_ids[live, t], out_logprobs[live, t] = tokens, logprobs
        if knobs.soft_topk:
            # The same definitions the training losses read (tail = exact log mass outside the ids).
            targets = topk_targets_from_logits(logits[:, None, :], k, knobs.soft_temperature)
            ids, lps, tail = targets.ids[:, 0], targets.logprobs[:, 0], targets.tail_logprob[:, 0]
            if all_rows:
                out_topk_ids[:, t], out_topk_lp[:, t], out_tail[:, t] = ids, lps, tail
            else:
                out_topk_ids[live, t], out_topk_lp[live, t], out_tail[live, t] = ids, lps, tail
        if eos is not None:
            hit = (tokens == eos) & ~was_finished
            now_finished = was_finished | hit
            if all_rows:
                lengths.masked_fill_(hit, t + 1)
                finished = now_finished
            else:
                lengths[live] = torch.where(hit, t + 1, lengths[live])
                finished[live] = now_finished
        if t == steps - 1:
            break

        if eos is not None and (t + 1) % knobs.sync_every == 0:
            alive = ~(finished if all_rows else finished[live])
            n_alive = int(alive.sum())  # CPU-GPU sync point, once every sync_every steps
            if n_alive == 0:
                break
            if static is None and n_alive <= (1.0 - _COMPACT_SHARE) * live.numel():
                keep = alive.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, tokens, positions, mask = live[keep], tokens[keep], positions[keep], mask[keep]
                all_rows = False

        past = width + t
        if static is None:
            logits = last_logits(model, spec, cache, tokens[:, None], mask[:, : past + 1], positions[:, None], past)
        else:
            logits = static.decode(spec, tokens, mask, positions, past)
        positions = positions + 1

    # One device-to-host copy per tensor per batch.
    out_ids, out_logprobs, lengths, finished = out_ids.cpu(), out_logprobs.cpu(), lengths.cpu(), finished.cpu()
    if knobs.soft_topk:
        out_topk_ids, out_topk_lp, out_tail = out_topk_ids.cpu(), out_topk_lp.cpu(), out_tail.cpu()

    results = []
    for j, prompt_index in enumerate(prompt_indices):  # padded copies of the static path are skipped
        for s in range(num_samples):
            row = j * num_samples + s
            n = int(lengths[row])
            result = SampleResult(
                prompt_index=prompt_index,
                sample_idx=s,
                completion_ids=out_ids[row, :n].tolist(),
                token_logprobs=out_logprobs[row, :n].tolist(),
                finish_reason="eos" if bool(finished[row]) else "length",
            )
            if knobs.soft_topk:
                result.topk_ids = out_topk_ids[row, :n].clone()
                result.topk_logprobs = out_topk_lp[row, :n].clone()
                result.tail_logprob = out_tail[row, :n].clone()
            results.append(result)
    return results
