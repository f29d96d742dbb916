"""Shared pieces of the teacher's hand-written decode loops (``sample.py``, ``beam.py``).

Both loops work on any Hugging Face causal LM: prompts are bucketed by length, left-padded with an
attention mask and explicit position ids, prefilled once into the model's KV cache, then decoded
one token per step. Everything here is plain torch; nothing imports Prefect.

transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (the old name is a
deprecated alias until 5.40) and dropped ``cache_position``; ``CallSpec`` reads the model's
``forward`` signature once so the loops pass whichever names this version takes.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Seeds for the per-batch generators are derived, not drawn, so a run is reproducible from
# (seed, batch index) alone: a large odd multiplier keeps nearby seeds' streams apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def validate_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, model: torch.nn.Module) -> None:
    """Refuse empty prompts and lengths past the model's position table, before any work starts."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS token)")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions; truncate prompts or lower max_new_tokens"
        )


def validate_loop(sync_every: int, static_cache: bool, compile: bool) -> None:
    """Refuse decode-loop settings that cannot work, before any work starts."""
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    if compile and not static_cache:
        raise ValueError("compile=True needs static_cache=True (the dynamic cache changes shape every step)")


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group prompt indices into batches of at most ``batch_size`` with similar lengths.

    Prompts are sorted by length (longest first, ties by index, so bucketing is deterministic) and
    cut into consecutive chunks: each batch pads only up to its own longest prompt, and the first
    batch is the largest, so out-of-memory shows up at once rather than at the end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class PaddedBatch:
    """Left-padded prompts. All tensors are int64 on the target device.

    input_ids [B, L]; attention_mask [B, L] (1 = real token); position_ids [B, L] (0..n-1 over the
    real tokens, 0 on pads, as ``generate`` does); lengths [B] (real tokens per row).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str) -> PaddedBatch:
    """Left-pad ``prompts`` to the longest one so every row's next token sits in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    lengths = mask.sum(-1)
    # One host-to-device copy per tensor per batch.
    return PaddedBatch(ids.to(device), mask.to(device), positions.to(device), lengths.to(device))


def batch_generator(device: torch.device, seed: int, batch_index: int) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, batch index): batches draw independent streams."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * _SEED_STRIDE + batch_index) & _SEED_MASK)
    return gen


class CallSpec:
    """How to call one model's forward with a cache, across transformers versions."""

    def __init__(self, model: torch.nn.Module):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.takes_cache_position = "cache_position" in params  # transformers 4.x only
        # Decode steps can hand SDPA a ready 4D mask (see ``last_logits``) unless some layers use a
        # sliding window or another pattern that transformers builds into its own masks.
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        layer_types = getattr(config, "layer_types", None) or []
        only_full = getattr(config, "sliding_window", None) is None and all(t == "full_attention" for t in layer_types)
        self.decode_mask_4d = getattr(model.config, "_attn_implementation", None) == "sdpa" and only_full

    def kwargs(
        self,
        cache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_len: int,
        last_only: bool,
    ) -> dict:
        kw = {
            "input_ids": input_ids,
            # Some models .view() the mask (GPT-2), and the loops pass a column slice of a
            # preallocated mask: one small [B, past + q] copy per step.
            "attention_mask": attention_mask.contiguous(),
            "position_ids": position_ids,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if last_only and self.logits_kw is not None:
            kw[self.logits_kw] = 1
        if self.takes_cache_position:
            kw["cache_position"] = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)
        return kw


def new_dynamic_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # lets hybrid models get sliding-window layers
    except TypeError:  # transformers 4.x
        return DynamicCache()


def last_logits(
    model: torch.nn.Module,
    spec: CallSpec,
    cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past_len: int,
) -> torch.Tensor:
    """One forward that appends ``input_ids`` [B, q] to ``cache``; returns float32 logits [B, V] of the last column.

    ``attention_mask`` covers the cache plus the new tokens ([B, past_len + q]), or the whole
    static cache. Only the last column's logits are computed where the model allows it
    (``logits_to_keep=1``), so a prefill never materialises [B, L, V].
    """
    if input_ids.shape[1] == 1 and spec.decode_mask_4d and attention_mask.shape[1] == past_len + 1:
        # transformers uses a 4D mask as given, skipping its per-forward `padding_mask.all()` check, a
        # CPU-GPU sync every step. A single query at the newest position needs no causal part when
        # the mask covers exactly the written slots (not a static cache's unwritten ones).
        attention_mask = attention_mask[:, None, None, :].bool()
    out = model(**spec.kwargs(cache, input_ids, attention_mask, position_ids, past_len, last_only=True))
    return out.logits[:, -1, :].float()


@dataclass
class Started:
    """A batch after its prefill, ready for one-token decode steps; ``rows`` = prompts × repeats.

    width: the padded prompt length (the first decode step writes cache slot ``width``).
    cache: the KV cache holding the prompts, each row repeated ``repeats`` times.
    logits: float32 [rows, V], the next-token logits of every row.
    mask: int64 [rows, width + steps] (dynamic) or [rows, cache_len] (static): the prompt mask, then
        ones for every new token; decode steps pass a view of its first columns (dynamic) or all of it
        (static, where the causal mask hides the unwritten slots), so nothing is concatenated per step.
    positions: int64 [rows], the position id of each row's next token.
    """

    width: int
    cache: object
    logits: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def start(
    model: torch.nn.Module, spec: CallSpec, prompts: Sequence[Sequence[int]], repeats: int, steps: int,
    pad_token_id: int, static: "StaticPlan | None",
) -> Started:
    """Left-pad ``prompts`` and prefill each once, repeating its cache rows ``repeats`` times (samples or beams).

    The static path first pads the batch to the plan's rows with copies of its first prompt (the
    caller drops their outputs) and prefills the repeated rows, since static layers cannot repeat rows.
    """
    if static is not None and len(prompts) * repeats < static.rows:
        prompts = list(prompts) + [prompts[0]] * (static.rows // repeats - len(prompts))
    device = model_device(model)
    padded = left_pad(prompts, pad_token_id, device)
    width = padded.input_ids.shape[1]
    total = static.cache_len if static is not None else width + steps
    mask = torch.ones((len(prompts) * repeats, total), dtype=torch.long, device=device)
    mask[:, :width] = padded.attention_mask.repeat_interleave(repeats, dim=0)
    positions = padded.lengths.repeat_interleave(repeats)
    if static is None:
        cache = new_dynamic_cache(model)
        logits = last_logits(model, spec, cache, padded.input_ids, padded.attention_mask, padded.position_ids, 0)
        cache.batch_repeat_interleave(repeats)
        logits = logits.repeat_interleave(repeats, dim=0)
    else:
        cache = static.cache
        cache.reset()
        logits = last_logits(
            model, spec, cache, padded.input_ids.repeat_interleave(repeats, dim=0), mask,
            padded.position_ids.repeat_interleave(repeats, dim=0), 0,
        )
    return Started(width, cache, logits, mask, positions)


class StaticPlan:
    """A ``StaticCache`` and decode step shared by every batch of one ``sample``/``beam_search`` call,
    so that shapes never change (every batch is padded to ``rows`` and ``cache_len``). A context
    manager: ``with StaticPlan(...) as plan:`` holds the model's static cache for the whole call.

    The cache and the compiled step are kept per model (one of each, like ``generate``'s own static
    cache) and reused by later calls of the same shape, so repeated calls neither re-allocate the
    cache nor re-capture CUDA graphs. The cache's memory stays allocated while the model lives.
    Calls from several threads on one model (shard tasks on a thread pool share the teacher) take
    turns: each holds the model's lock from set-up to its last step.
    """

    _per_model: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, model: torch.nn.Module, rows: int, cache_len: int, compile: bool):
        self.model, self.rows, self.cache_len, self.compile = model, rows, cache_len, compile
        with self._registry_lock:
            self._kept = self._per_model.setdefault(model, {"lock": threading.Lock()})

    def __enter__(self) -> "StaticPlan":
        from transformers import StaticCache

        self._kept["lock"].acquire()
        try:
            kept, model = self._kept, self.model
            weight = next(model.parameters())
            shape = (self.rows, self.cache_len, weight.dtype, weight.device)
            if kept.get("shape") != shape:
                # Drop the old cache first: its memory is free for the new one, and a failed
                # allocation leaves no cache recorded under either shape.
                kept.pop("shape", None)
                kept.pop("cache", None)
                kept["cache"] = StaticCache(config=model.config, max_cache_len=self.cache_len)
                kept["shape"] = shape
            self.cache = kept["cache"]
            self.step = model
            if self.compile:
                if "compiled" not in kept:
                    mode = "reduce-overhead" if model_device(model).type == "cuda" else "default"
                    kept["compiled"] = torch.compile(model.__call__, mode=mode, fullgraph=False, dynamic=False)
                self.step = kept["compiled"]
            self.cuda_graphs = self.compile and model_device(model).type == "cuda"
        except BaseException:
            # `with` runs __exit__ only after __enter__ returned: release here, or every later call on
            # this model (every later shard task in the process) waits on the lock for ever.
            self._kept["lock"].release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._kept["lock"].release()

    def decode(self, spec: CallSpec, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: int) -> torch.Tensor:
        """Append ``tokens`` [rows] at ``positions`` [rows]; returns float32 logits [rows, V].

        ``mask`` is the whole [rows, cache_len] mask: the causal mask hides the slots not written yet."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.step(**spec.kwargs(self.cache, tokens[:, None], mask, positions[:, None], past, last_only=True))
        # Clone: a CUDA-graph replay overwrites its outputs on the next step.
        return out.logits[:, -1, :].float().clone()
