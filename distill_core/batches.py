"""Training batches from prepared data and teacher caches, in a deterministic, resumable order.

The order of rows is a pure function of (seed, epoch): shards are visited in a seeded permutation
and rows within a shard in another, so a resumed run that skips the first ``n`` batches sees
exactly the batches an uninterrupted run would. Only one shard is held in memory at a time.
This module holds streams and collation only; each cache kind's Parquet reader sits beside its
writer (teacher/topk.py, teacher/samples_cache.py, teacher/beams_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from distill_core.cache.ref import CacheRef, shards_for
from distill_core.cache.shards import read_manifest
from distill_core.data import DataRef, read_data_shard
from distill_core.errors import CacheError
from distill_core.losses.signals import SampledTargets, TopKTargets
from distill_core.storage import Storage
from distill_core.teacher.beams_cache import BEAMS_COLUMNS, read_beams_table
from distill_core.teacher.samples_cache import read_samples_table, samples_columns
from distill_core.teacher.topk import read_targets, topk_columns


@dataclass
class Batch:
    """input_ids int64 [B, T]; loss_mask bool [B, T-1]: positions whose next token is trained on;
    targets: the teacher's top-k (or sampled targets) over the same T-1 positions, or None.

    Across tokenizers (:mod:`distill_core.retokenize`) the soft targets cover only some positions:
    soft_mask bool [B, T-1] marks those of ``targets`` (exact match), uld_targets and uld_mask those of
    the ULD term; None means ``targets`` and ``loss_mask`` serve every term."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    targets: TopKTargets | SampledTargets | None = None
    soft_mask: torch.Tensor | None = None
    uld_targets: TopKTargets | None = None
    uld_mask: torch.Tensor | None = None

    def _map(self, tensor, targets) -> "Batch":
        opt = lambda x, f: f(x) if x is not None else None  # noqa: E731
        return Batch(tensor(self.input_ids), tensor(self.loss_mask), opt(self.targets, targets), opt(self.soft_mask, tensor),
                     opt(self.uld_targets, targets), opt(self.uld_mask, tensor))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device), lambda t: t.to(device))

    @property
    def groups(self) -> int:
        """Units that must stay together when a batch is split across processes (rows here)."""
        return self.input_ids.shape[0]

    def shard(self, rank: int, size: int) -> "Batch":
        """This process's equal slice of the rows (``groups`` must divide by ``size``)."""
        rows = _slice(self.input_ids.shape[0], rank, size)
        return self._map(lambda t: t[rows], lambda t: t.rows(rows))


@dataclass
class BeamBatch:
    """P prompts × N teacher beam candidates, flattened prompt-major.

    input_ids int64 [P·N, L] (prompt + candidate, right-padded); loss_mask bool [P·N, L-1] over the
    candidate's tokens; teacher_scores float32 [P, N] (length-normalised); valid bool [P, N];
    is_top1 bool [P·N]: the teacher's best candidate of each prompt."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    teacher_scores: torch.Tensor
    valid: torch.Tensor
    is_top1: torch.Tensor

    def to(self, device) -> "BeamBatch":
        return BeamBatch(*(t.to(device) for t in (self.input_ids, self.loss_mask, self.teacher_scores, self.valid, self.is_top1)))

    @property
    def groups(self) -> int:
        return self.teacher_scores.shape[0]

    def shard(self, rank: int, size: int) -> "BeamBatch":
        p, n = self.teacher_scores.shape
        prompts = _slice(p, rank, size)
        rows = slice(prompts.start * n, prompts.stop * n)
        return BeamBatch(self.input_ids[rows], self.loss_mask[rows], self.teacher_scores[prompts], self.valid[prompts], self.is_top1[rows])


class StepBatch(dict):
    """One micro-batch per source ("data", "samples", "beams") that some loss term trains on."""

    def to(self, device) -> "StepBatch":
        return StepBatch({k: v.to(device) for k, v in self.items()})

    def shard(self, rank: int, size: int) -> "StepBatch":
        return StepBatch({k: v.shard(rank, size) for k, v in self.items()})

    @property
    def groups(self) -> int:
        return min(v.groups for v in self.values())

    @property
    def num_tokens(self) -> int:
        return sum(v.input_ids.numel() for v in self.values())


def _slice(n: int, rank: int, size: int) -> slice:
    b = n // size
    return slice(rank * b, (rank + 1) * b)


# A shard loader returns a dict of numpy arrays with the same leading dimension (rows).
ShardLoader = Callable[[], dict[str, np.ndarray]]


class RowStream:
    """Seeded, resumable stream of rows over shards loaded one at a time."""

    def __init__(self, loaders: list[ShardLoader], sizes: list[int], seed: int):
        if not loaders or sum(sizes) == 0:
            raise CacheError("no training rows: the prepared data or cache is empty; rerun prepare_data.")
        self.loaders, self.sizes, self.seed = loaders, sizes, seed

    def rows(self, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield single rows forever, after skipping the first ``skip`` rows."""
        total = sum(self.sizes)
        epoch, skip = divmod(skip, total)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.loaders))
            for shard in order:
                size = self.sizes[shard]
                if skip >= size:
                    skip -= size
                    continue
                arrays = self.loaders[shard]()
                perm = np.random.default_rng([self.seed, epoch, int(shard)]).permutation(size)
                for i in perm[skip:]:
                    yield {k: v[i] for k, v in arrays.items()}
                skip = 0
            epoch += 1

    def batches(self, batch_size: int, skip_batches: int = 0) -> Iterator[list[dict[str, np.ndarray]]]:
        """Lists of ``batch_size`` rows, after skipping ``skip_batches`` such lists."""
        rows = self.rows(skip_batches * batch_size)
        while True:
            yield [next(rows) for _ in range(batch_size)]


def topk_stream(storage: Storage, data: DataRef, cache: CacheRef | None, seed: int, temperature: float | None = None) -> RowStream:
    """Rows of packed train sequences, joined with their top-k targets when ``cache`` is given, at
    ``temperature`` (default: the cache's capture temperature; must be one the cache serves)."""
    tau = cache.meta["temperature"] if cache is not None and temperature is None else temperature
    entries = read_manifest(storage, data.train)["shards"]
    cache_names = shards_for(cache, storage, data.train) if cache else [None] * len(entries)
    store = cache.open(storage) if cache else None

    def loader(data_name: str, cache_name: str | None) -> ShardLoader:
        def load() -> dict[str, np.ndarray]:
            seq_ids, input_ids = read_data_shard(storage, data.train, data_name)
            out = {"input_ids": input_ids}
            if cache_name is not None:
                c_seq, targets = read_targets(store.read_shard(cache_name, topk_columns(cache.meta)), cache.meta, tau)
                if not np.array_equal(c_seq, seq_ids):
                    raise CacheError(f"{cache.folder}/{cache_name} rows do not match {data.train}/{data_name}: recompute the cache.")
                out.update(targets)
            return out

        return load

    loaders = [loader(e["name"], c) for e, c in zip(entries, cache_names)]
    return RowStream(loaders, [e["rows"] for e in entries], seed)


def samples_stream(storage: Storage, data: DataRef, cache: CacheRef, seed: int) -> RowStream:
    """Rows of teacher samples: prompt_ids, completion_ids (+ soft top-k over the completion)."""
    soft_k = cache.meta["soft_topk"]
    return _prompted_stream(storage, data, cache, seed, lambda t: read_samples_table(t, soft_k), samples_columns(soft_k))


def beams_stream(storage: Storage, data: DataRef, cache: CacheRef, seed: int) -> RowStream:
    """Rows of prompts, each with all N teacher beam candidates (best first) and their scores."""
    n = cache.meta["num_beams"]
    return _prompted_stream(storage, data, cache, seed, lambda t: read_beams_table(t, n), BEAMS_COLUMNS, table_rows_per_row=n)


def _prompted_stream(storage: Storage, data: DataRef, cache: CacheRef, seed: int, read, columns: tuple[str, ...],
                     table_rows_per_row: int = 1) -> RowStream:
    """A stream over the cache shards that cover the cache's prompts; ``read`` turns a shard (which must
    have ``columns``) into rows."""
    names = shards_for(cache, storage, data.train, rows=cache.meta["num_prompts"])
    store = cache.open(storage)
    sizes = {e.name: e.rows // table_rows_per_row for e in store.shards}
    loaders = [lambda name=name: read(store.read_shard(name, columns)) for name in names]
    return RowStream(loaders, [sizes[name] for name in names], seed)


def collate_data(rows: list[dict[str, np.ndarray]]) -> Batch:
    """Packed sequences: every position is trained on."""
    input_ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]))
    mask = torch.ones(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.bool)
    targets = None
    stack = lambda key: torch.from_numpy(np.stack([r[key] for r in rows]))  # noqa: E731
    if "topk_ids" in rows[0]:
        targets = TopKTargets(*(stack(k) for k in ("topk_ids", "topk_logprobs", "tail_logprob")))
    elif "sparse_ids" in rows[0]:
        targets = SampledTargets(*(stack(k) for k in ("sparse_ids", "sparse_logprobs", "sparse_mass", "tail_logprob")),
                                 head=int(rows[0]["sparse_head"]))
    return Batch(input_ids, mask, targets)


def collate_samples(rows: list[dict[str, np.ndarray]], pad_id: int) -> Batch:
    """prompt + completion, right-padded; the loss is masked to positions that predict a completion token.

    Soft targets (when stored) fill those positions; other positions (prompt, padding) get a uniform target
    over the k ids and the tail bucket, every category finite: a −inf tail there would make reverse KL's
    masked-out terms infinite and their (masked) gradients NaN."""
    seqs = [np.concatenate([r["prompt_ids"], r["completion_ids"]]) for r in rows]
    length = max(map(len, seqs))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    soft = "topk_ids" in rows[0]
    if soft:
        k = rows[0]["topk_ids"].shape[1]
        ids = torch.arange(k).repeat(len(rows), length - 1, 1)
        lps = torch.full((len(rows), length - 1, k), -float(np.log(k + 1)))
        tail = torch.full((len(rows), length - 1), -float(np.log(k + 1)))
    for i, (r, seq) in enumerate(zip(rows, seqs)):
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        input_ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        mask[i, p - 1 : p - 1 + c] = True  # position t predicts token t+1
        if soft:
            ids[i, p - 1 : p - 1 + c] = torch.from_numpy(r["topk_ids"])
            lps[i, p - 1 : p - 1 + c] = torch.from_numpy(r["topk_logprobs"])
            tail[i, p - 1 : p - 1 + c] = torch.from_numpy(r["tail_logprob"])
    return Batch(input_ids, mask, TopKTargets(ids, lps, tail) if soft else None)


def collate_beams(rows: list[dict], pad_id: int, samples: Callable[[list[dict]], Batch] | None = None) -> BeamBatch:
    """Every candidate of every prompt as one row (prompt-major), masked to the candidate's tokens;
    ``samples`` collates the (prompt, candidate) rows (default :func:`collate_samples`; a student with
    its own tokenizer: ``Retokenizer.collate_samples``)."""
    flat = [{"prompt_ids": r["prompt_ids"], "completion_ids": c} for r in rows for c in r["candidates"]]
    base = (samples or (lambda f: collate_samples(f, pad_id)))(flat)
    scores = torch.from_numpy(np.stack([r["scores"] for r in rows]).astype(np.float32))
    n = scores.shape[1]
    is_top1 = torch.zeros(len(flat), dtype=torch.bool)
    is_top1[::n] = True  # candidates are stored best first
    return BeamBatch(base.input_ids, base.loss_mask, scores, torch.ones_like(scores, dtype=torch.bool), is_top1)


def collators(pad_id: int, overrides: dict[str, Callable] | None = None) -> dict[str, Callable[[list[dict]], Batch | BeamBatch]]:
    """``source -> (rows -> micro-batch)`` for data, samples, beams and student_samples (graded student
    samples, collated like teacher samples). ``overrides`` replaces a source's collation (a student with
    its own tokenizer: ``retokenize``)."""
    samples = lambda rows: collate_samples(rows, pad_id)  # noqa: E731
    return {"data": collate_data, "samples": samples, "student_samples": samples,
            "beams": lambda rows: collate_beams(rows, pad_id), **(overrides or {})}


def step_batches(streams: dict[str, RowStream], batch_size: int, pad_id: int,
                 collate: dict[str, Callable] | None = None) -> Callable[[int], Iterator[StepBatch]]:
    """``skip -> iterator of StepBatch``: one micro-batch from each source's stream per step;
    ``collate`` as ``collators``' overrides."""
    collate = collators(pad_id, collate)

    def batches(skip: int) -> Iterator[StepBatch]:
        its = {src: stream.batches(batch_size, skip) for src, stream in streams.items()}
        while True:
            yield StepBatch({src: collate[src](next(it)) for src, it in its.items()})

    return batches
