"""Soft targets at every training position: the teacher's top-k (plus tail mass), draws from it, or both.

Only what a strategy keeps leaves the device (see :mod:`distill_core.cache.codec` for how it is
stored); the full-vocabulary logits never do.
"""

from __future__ import annotations

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

    teacher_logits: [B, T, V] any float dtype (computed in float32). uniforms: float64 [B, T, draws]
    in [0, 1) for sampled and hybrid (see :func:`draw_uniforms`), inverse-CDF draws from the teacher
    at ``cfg.temperature`` (hybrid: from its mass outside the top-k). Working memory: three float32
    copies of the logits."""
    assert teacher_logits.dim() == 3, f"teacher_logits must be [B, T, V], got shape {tuple(teacher_logits.shape)}"
    x = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    n, vocab = x.shape
    taus = cfg.served_temperatures()
    lse = torch.stack([torch.logsumexp(_scaled(x, t), dim=-1) for t in taus], dim=-1)
    head = 0 if cfg.strategy == "sampled" else min(cfg.k, vocab)
    parts_ids, parts_z, parts_pos = [], [], []
    tail = None
    if head:
        top_ids = x.topk(head, dim=-1).indices.sort(dim=-1).values  # the top-k is the same set at every τ
        parts_ids.append(top_ids.reshape(-1))
        parts_z.append(x.gather(-1, top_ids).reshape(-1))
        parts_pos.append(torch.arange(n, device=x.device).repeat_interleave(head))
        if head == vocab:
            tail = torch.full((n, len(taus)), float("-inf"), device=x.device)
        else:
            rest = x.scatter(-1, top_ids, float("-inf"))
            tail = torch.stack([torch.logsumexp(_scaled(rest, t), dim=-1) for t in taus], dim=-1) - lse
    n_drawn = torch.zeros(n, dtype=torch.int64)
    counts = torch.zeros(0, dtype=torch.int64)
    if cfg.strategy != "topk" and head < vocab:
        assert uniforms is not None, "sampled and hybrid need uniforms for their draws"
        p = torch.softmax(x / cfg.temperature, dim=-1)
        if head:
            p.scatter_(-1, top_ids, 0.0)
        cdf = p.cumsum_(dim=-1)
        # float32 like the logits: a float64 copy of the CDF would double this step's memory
        total = cdf[:, -1:]
        u = torch.minimum(uniforms.reshape(n, -1).to(x.device, torch.float32) * total, torch.nextafter(total, torch.zeros_like(total)))
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1).sort(dim=-1).values
        first = torch.ones_like(drawn, dtype=torch.bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        n_drawn = first.sum(-1).cpu()
        where = first.reshape(-1).nonzero().squeeze(-1).cpu()
        counts = torch.diff(where, append=torch.tensor([drawn.numel()]))
        parts_ids.append(drawn[first])
        parts_z.append(x.gather(-1, drawn)[first])
        parts_pos.append(torch.arange(n, device=x.device).unsqueeze(-1).expand_as(drawn)[first])
    pos = torch.cat(parts_pos)
    order = torch.sort(pos, stable=True).indices  # per position: head ids, then drawn ids
    return codec.SparseRows(
        head=head,
        ids=torch.cat(parts_ids)[order].cpu().numpy(),
        logits=torch.cat(parts_z)[order].cpu().numpy().astype(np.float32),
        lse=lse.cpu().numpy().astype(np.float32),
        n_drawn=n_drawn.numpy().astype(np.int64),
        counts=counts.numpy().astype(np.int64),
        tail=tail.cpu().numpy().astype(np.float32) if tail is not None else None,
    )


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / temperature``, without a copy of [N, V] at temperature 1."""
    return x if temperature == 1.0 else x / temperature


def _topk_table(model, seq_ids: np.ndarray, input_ids: np.ndarray, cfg: TopKConfig, device) -> pa.Table:
    """The shard's table. Batch i's sparse targets (top-k, draws, the copy to the host) are computed
    on a second thread while the teacher runs batch i+1's forward (on CUDA on a side stream, so the
    device overlaps them too); at most two batches' logits are alive. The same functions on the same
    inputs: the bytes do not depend on the overlap."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    batches, pending = [], None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="topk") as pool:
        for start in range(0, len(input_ids), cfg.batch_size):
            batch = torch.from_numpy(input_ids[start : start + cfg.batch_size]).to(device)
            uniforms = None
            if cfg.strategy != "topk":
                uniforms = draw_uniforms(cfg.seed, seq_ids[start : start + cfg.batch_size], batch.shape[1] - 1, cfg.draws)
            with torch.inference_mode(), autocast:
                logits = model(input_ids=batch).logits[:, :-1]
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
