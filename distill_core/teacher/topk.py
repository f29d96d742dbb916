"""Soft targets at every training position: the teacher's top-k (plus tail mass), draws from it, or both.

Only what a strategy keeps leaves the device (see :mod:`distill_core.cache.codec` for how it is
stored); the full-vocabulary logits never do.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from distill_core.cache import codec, stage
from distill_core.cache.ref import CacheRef, teacher_cache_ref
from distill_core.cache.stage import ShardJob
from distill_core.config import TopKConfig
from distill_core.data import DataRef
from distill_core.errors import CacheError
from distill_core.storage import Storage

Progress = Callable[[int, int], None]


def topk_cache_ref(cfg: TopKConfig, teacher: dict, data: DataRef) -> CacheRef:
    """The content address of a top-k cache (see :func:`teacher_cache_ref`): strategy and its settings,
    the temperatures served and the codec. ``k`` is the exact head per position (0 for sampled)."""
    settings = {"strategy": cfg.strategy, "k": 0 if cfg.strategy == "sampled" else cfg.k, "temperature": cfg.temperature,
                "temperatures": cfg.served_temperatures(), "codec": codec.CODEC}
    if cfg.strategy != "topk":
        settings.update(draws=cfg.draws, seed=cfg.seed)
    return teacher_cache_ref("topk", settings, teacher, data)


def topk_job(cfg: TopKConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The top-k stage as a ShardJob: one cache shard per train data shard, every row of it."""

    def compute(model, seq_ids: np.ndarray, input_ids: np.ndarray, _data_sha256: str) -> pa.Table:
        return _topk_table(model, seq_ids, input_ids, cfg, next(model.parameters()).device)

    return ShardJob(ref=topk_cache_ref(cfg, teacher, data), rows=None, compute=compute)


def cache_topk(
    load_model: Callable[[], torch.nn.Module], data: DataRef, teacher: dict, cfg: TopKConfig, storage: Storage,
    progress: Progress | None = None,
) -> CacheRef:
    """Write top-k shards for every train shard of ``data`` not yet in the cache; returns the cache ref.

    The whole stage in one process (see :mod:`distill_core.cache.stage`); ``load_model`` is called
    once, and only when some shard is missing, so a finished cache costs no teacher load."""
    return stage.run_all(topk_job(cfg, teacher, data), load_model, data, storage, progress)


def draw_uniforms(seed: int, seq_ids: np.ndarray, positions: int, draws: int) -> torch.Tensor:
    """Uniforms in [0, 1) for the draws of each sequence: float64 [n, positions, draws].

    Keyed by (seed, seq_id) alone, so a sequence gets the same draws whatever its shard, batch or device."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, int(s)]).random((positions, draws)) for s in seq_ids]))


def sparse_from_logits(teacher_logits: torch.Tensor, cfg: TopKConfig, uniforms: torch.Tensor | None = None) -> codec.SparseRows:
    """What a cache stores of the teacher's logits, per ``cfg.strategy``, for all B·T positions.

    teacher_logits: [B, T, V] any float dtype (computed in float32). uniforms: float64 [B, T, draws] in
    [0, 1) for sampled and hybrid (see :func:`draw_uniforms`), inverse-CDF draws from the teacher at
    ``cfg.temperature`` (hybrid: from its mass outside the top-k). One sequence at a time (each
    ``teacher_logits[b]`` is contiguous in a slice ``logits[:, :-1]`` of a model's output, so nothing
    copies the batch), so the working memory is about three float32 copies of one sequence's [T, V]
    logits; what is kept reaches the host in one copy per array (on CUDA through pinned buffers, the
    device not waiting for the host)."""
    if teacher_logits.dim() != 3 or len(teacher_logits) == 0:
        raise ValueError(f"teacher_logits must be [B, T, V] with B ≥ 1, got shape {tuple(teacher_logits.shape)}")
    if cfg.strategy != "topk" and uniforms is None:
        raise ValueError(f"the {cfg.strategy} strategy draws from the teacher: pass uniforms (see draw_uniforms)")
    seqs = [_sparse_rows(teacher_logits[b].detach().float(), cfg, None if uniforms is None else uniforms[b])
            for b in range(teacher_logits.shape[0])]
    names = [name for name, value in seqs[0].items() if value is not None]
    host = _to_host({name: torch.cat([seq[name] for seq in seqs]) for name in names})
    return codec.SparseRows(
        head=0 if cfg.strategy == "sampled" else min(cfg.k, teacher_logits.shape[-1]),
        ids=host["ids"], logits=host["logits"], lse=host["lse"], n_drawn=host["n_drawn"], counts=host["counts"],
        tail=host.get("tail"),
    )


def _sparse_rows(x: torch.Tensor, cfg: TopKConfig, uniforms: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """:func:`sparse_from_logits` of one block of positions, on x's device: x float32 [n, V], uniforms
    float64 [n, draws] or None. Returns ids int64 and logits float32 (flat, per position its head ids
    ascending then its distinct drawn ids), lse and tail float32 [n, nT] (tail None without a head),
    n_drawn int64 [n] and counts int64 [drawn ids].

    Per served τ, one softmax; the head's probabilities are read and zeroed in place and the rest summed:
    the mass outside the head is summed directly (never 1 − Σ head, which loses every digit of a small
    tail), with no copy of x with the head masked out. The log-normaliser comes from the peak's own
    probability (exactly 1 / Σ exp(x − max)). A rest that underflows float32 is floored at its smallest
    normal number (e^-87; the codec floors tails at e^-32)."""
    n, vocab = x.shape
    taus = cfg.served_temperatures()
    head = 0 if cfg.strategy == "sampled" else min(cfg.k, vocab)
    if head:
        top = x.topk(head, dim=-1)
        peak, arg = top.values[:, :1], top.indices[:, :1]
        top_ids = top.indices.sort(dim=-1).values  # the same set at every τ
    else:
        peak, arg = x.max(dim=-1, keepdim=True)
    lse, tail, capture = [], [], None
    for tau in taus:
        p = torch.softmax(x if tau == 1.0 else x / tau, dim=-1)
        lse.append((peak.double() / tau - torch.log(p.gather(-1, arg).double())).squeeze(-1))
        if head:
            head_sum = p.gather(-1, top_ids).double().sum(-1)
            p.scatter_(-1, top_ids, 0.0)
            rest = p.sum(-1).double()
            if head < vocab:
                rest.clamp_(min=torch.finfo(torch.float32).tiny)
            tail.append(torch.log(rest) - torch.log(rest + head_sum))  # log 0 = −inf: nothing outside the head
        if cfg.strategy != "topk" and tau == float(cfg.temperature):
            capture = p  # the teacher's distribution at the capture temperature, outside the head
    out = {"lse": torch.stack(lse, -1).float(), "tail": torch.stack(tail, -1).float() if head else None}
    parts_ids, parts_z, parts_pos = [], [], []
    if head:
        parts_ids.append(top_ids.reshape(-1))
        parts_z.append(x.gather(-1, top_ids).reshape(-1))
        parts_pos.append(torch.arange(n, device=x.device).repeat_interleave(head))
    out["n_drawn"] = torch.zeros(n, dtype=torch.int64, device=x.device)
    out["counts"] = torch.zeros(0, dtype=torch.int64, device=x.device)
    if cfg.strategy != "topk" and head < vocab:
        cdf = capture.cumsum_(dim=-1)
        # float32 like the logits: a float64 copy of the CDF would double this step's memory
        total = cdf[:, -1:]
        u = torch.minimum(uniforms.reshape(n, -1).to(x.device, torch.float32) * total, torch.nextafter(total, torch.zeros_like(total)))
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1).sort(dim=-1).values
        first = torch.ones_like(drawn, dtype=torch.bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        out["n_drawn"] = first.sum(-1)
        where = first.reshape(-1).nonzero().squeeze(-1)
        out["counts"] = torch.diff(where, append=where.new_tensor([drawn.numel()]))
        parts_ids.append(drawn[first])
        parts_z.append(x.gather(-1, drawn)[first])
        parts_pos.append(torch.arange(n, device=x.device).unsqueeze(-1).expand_as(drawn)[first])
    order = torch.sort(torch.cat(parts_pos), stable=True).indices  # per position: head ids, then drawn ids
    out["ids"], out["logits"] = torch.cat(parts_ids)[order], torch.cat(parts_z)[order]
    return out


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each tensor as a numpy array. From CUDA, every copy is queued into a pinned host buffer without
    blocking, and the current stream is waited for once, after the last."""
    if all(t.device.type == "cpu" for t in tensors.values()):
        return {name: t.numpy() for name, t in tensors.items()}
    pinned = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in tensors.items()}
    for name, t in tensors.items():
        pinned[name].copy_(t, non_blocking=True)
    torch.cuda.current_stream(next(iter(tensors.values())).device).synchronize()
    return {name: t.numpy() for name, t in pinned.items()}


def _topk_table(model, seq_ids: np.ndarray, input_ids: np.ndarray, cfg: TopKConfig, device) -> pa.Table:
    """The shard's table. Batch i's sparse targets (top-k, draws, the copy to the host) are computed
    on a second thread while the teacher runs batch i+1's forward where that can overlap: on CUDA on a
    side stream (the device overlaps them too), on CPU on the cores the forward leaves free (see
    :func:`_worker_threads`); otherwise after each forward on the same thread. At most two batches'
    logits are alive. The same functions on the same inputs: the bytes do not depend on the overlap."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    threads = _worker_threads(device)
    # OpenMP's thread count is per calling thread: the worker's does not change the forward's
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="topk", initializer=lambda: torch.set_num_threads(threads)) if threads else nullcontext()
    batches, pending = [], None
    with worker as pool:
        for start in range(0, len(input_ids), cfg.batch_size):
            batch = torch.from_numpy(input_ids[start : start + cfg.batch_size]).to(device)
            uniforms = None
            if cfg.strategy != "topk":
                uniforms = draw_uniforms(cfg.seed, seq_ids[start : start + cfg.batch_size], batch.shape[1] - 1, cfg.draws)
            with torch.inference_mode(), autocast:
                logits = model(input_ids=batch).logits[:, :-1]
            if pool is None:
                with torch.inference_mode():
                    batches.append(sparse_from_logits(logits, cfg, uniforms))
                continue
            ready = None
            if side is not None:
                ready = torch.cuda.Event()
                ready.record()  # the forward's end on the current stream
                logits.record_stream(side)  # not reused by the forward's allocator while the side stream reads it
            if pending is not None:
                batches.append(pending.result())
            pending = pool.submit(_sparse_off_thread, logits, cfg, uniforms, side, ready)
        if pending is not None:
            batches.append(pending.result())
    return codec.encode_table(seq_ids, codec.concat(batches), cfg.served_temperatures())


def _worker_threads(device) -> int:
    """Intra-op threads for the sparse targets' thread, 0 for none. On CUDA 1 (the work is the device's);
    on CPU the cores the forward's torch threads leave free, since where the forward uses every core a
    second thread only contends with it (measured slower than in series)."""
    if device.type == "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - torch.get_num_threads())


def _sparse_off_thread(logits: torch.Tensor, cfg: TopKConfig, uniforms, side, ready) -> codec.SparseRows:
    """:func:`sparse_from_logits` on the worker thread; on ``side`` (a CUDA stream) after ``ready``."""
    with torch.inference_mode():
        if side is None:
            return sparse_from_logits(logits, cfg, uniforms)
        side.wait_event(ready)
        with torch.cuda.stream(side):
            return sparse_from_logits(logits, cfg, uniforms)


def read_targets(table: pa.Table, meta: dict, temperature: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A top-k shard's targets at ``temperature``, per sequence row: seq_ids [n] and arrays [n, T-1, ...].

    topk caches give topk_ids int64 [n, T-1, k], topk_logprobs float32, tail_logprob float32 [n, T-1];
    sampled and hybrid ones give sparse_ids, sparse_logprobs, sparse_mass [n, T-1, k + draws],
    tail_logprob and sparse_head [n] (see :class:`SampledTargets`). Refuses a temperature the cache
    does not serve, naming those it does."""
    if "codec" not in meta:  # the float16 codec of caches written before strategies existed
        if abs(float(temperature) - float(meta["temperature"])) > 1e-9:
            raise CacheError(f"this top-k cache serves temperature {meta['temperature']} only, not {temperature}: train at "
                             f"{meta['temperature']}, or recompute the cache with topk.temperatures [{temperature}].")
        seq_ids, ids, lps, tail = read_topk_table(table, meta["k"])
        return seq_ids, {"topk_ids": ids, "topk_logprobs": lps, "tail_logprob": tail}
    if meta["codec"] != codec.CODEC:
        raise CacheError(f"this top-k cache uses codec {meta['codec']}, which this code ({codec.CODEC}) cannot read: "
                         "upgrade distillery, or recompute the cache into a fresh folder.")
    taus, head = meta["temperatures"], meta["k"]
    seq_ids, rows = codec.decode_table(table, head, taus)
    n, positions = len(seq_ids), rows.positions // len(seq_ids)
    lp = codec.logprobs_at(rows, taus, temperature)
    col = codec.temperature_column(taus, temperature)
    tail = rows.tail[:, col] if rows.tail is not None else np.zeros(rows.positions, np.float32)
    shape = lambda a: a.reshape(n, positions, *a.shape[1:])  # noqa: E731
    if meta["strategy"] == "topk":
        return seq_ids, {"topk_ids": shape(rows.ids.reshape(-1, head)), "topk_logprobs": shape(lp.reshape(-1, head)),
                         "tail_logprob": shape(tail)}
    capture = codec.logprobs_at(rows, taus, meta["temperature"])
    drawn = codec.drawn_mask(rows)
    share = rows.counts / meta["draws"]
    if head:  # hybrid draws come from the mass outside the top-k at the capture temperature
        share = share * np.exp(rows.tail[:, codec.temperature_column(taus, meta["temperature"])].astype(np.float64))[drawn.pos]
    mass = np.exp(lp.astype(np.float64))
    mass[drawn.mask] = share * np.exp((lp - capture)[drawn.mask].astype(np.float64))
    width = head + meta["draws"]
    return seq_ids, {
        "sparse_ids": shape(codec.padded(rows, rows.ids, width, 0)),
        "sparse_logprobs": shape(codec.padded(rows, lp, width, np.float32(0.0))),
        "sparse_mass": shape(codec.padded(rows, mass.astype(np.float32), width, np.float32(0.0))),
        "tail_logprob": shape(tail),
        "sparse_head": np.full(n, head, dtype=np.int64),
    }


TOPK_COLUMNS = ("seq_id", "ids", "logprobs", "tail_logprob")  # what the float16 codec wrote


def topk_columns(meta: dict) -> tuple[str, ...]:
    """The columns every shard of the top-k cache with manifest ``meta`` holds (``read_targets`` reads them)."""
    if "codec" not in meta:
        return TOPK_COLUMNS
    return codec.table_columns(head=meta["k"], drawn=meta["strategy"] != "topk")


def read_topk_table(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unpack a float16-codec top-k shard (caches written before ``codec``): seq_ids [n], ids int64
    [n, T-1, k], logprobs float32 [n, T-1, k], tail float32 [n, T-1]."""
    n = table.num_rows
    flat = lambda name: table[name].combine_chunks().values.to_numpy(zero_copy_only=False)  # noqa: E731
    ids = flat("ids").astype(np.int64).reshape(n, -1, k)
    lps = flat("logprobs").astype(np.float32).reshape(n, -1, k)
    tail = flat("tail_logprob").astype(np.float32).reshape(n, -1)
    return table["seq_id"].to_numpy(), ids, lps, tail
