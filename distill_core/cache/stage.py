"""Teacher stages that turn train data shards into cache shards, one shard at a time.

A stage is a :class:`ShardJob`: where its cache lives (a content-addressed CacheRef), how many
train rows it covers, and how one data shard becomes one cache shard. The same four steps serve
every kind (top-k, samples, beams): :func:`plan` lists the data shards still to do, :func:`run_shard`
computes one and records it (safe to run for many shards at once: Dask workers, threads),
:func:`commit` lists every recorded shard in the manifest in one write, and :func:`run_all` does all
of it in one process.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from distill_core.cache.ref import CacheRef, cache_shard_name, prompt_plan
from distill_core.cache.shards import ShardStore, read_manifest
from distill_core.data import DataRef, read_data_shard
from distill_core.errors import CacheError
from distill_core.storage import Storage

Progress = Callable[[int, int], None]
# (teacher model, seq_ids int64 [n], input_ids int64 [n, T], data shard sha256) -> the cache shard's table
Compute = Callable[[torch.nn.Module, np.ndarray, np.ndarray, str], pa.Table]


@dataclass(frozen=True)
class ShardJob:
    ref: CacheRef
    rows: int | None  # the first rows of the train split this cache covers (None: every row)
    compute: Compute


def _plan(job: ShardJob, data: DataRef, storage: Storage) -> list[tuple[dict, int]]:
    return prompt_plan(read_manifest(storage, data.train)["shards"], job.rows)


def plan(job: ShardJob, data: DataRef, storage: Storage) -> list[str]:
    """Names of the train data shards whose cache shard is neither committed nor recorded, in data order."""
    store = job.ref.open(storage)
    recorded = store.recorded()
    return [
        entry["name"] for entry, _ in _plan(job, data, storage)
        if not store.committed(name := cache_shard_name(entry["sha256"])) and name not in recorded
    ]


def run_shard(job: ShardJob, load_model: Callable[[], torch.nn.Module], data: DataRef, storage: Storage, shard: str) -> dict:
    """Compute and record the cache shard for the train data shard named ``shard``; returns its entry.

    Writes the shard and its commit record but not the manifest. Does nothing (and loads no
    teacher) when the shard is already committed or recorded, so a retried task is cheap."""
    store, name, table, done = _compute(job, load_model, data, storage, shard)
    return done if table is None else store.put_shard(name, table, source=f"{data.train}/{shard}").__dict__


def _compute(job: ShardJob, load_model, data: DataRef, storage: Storage, shard: str) -> tuple[ShardStore, str, pa.Table | None, dict | None]:
    """(store, cache shard name, its computed table, None), or (store, name, None, its entry) when the
    shard is already committed or recorded."""
    store = job.ref.open(storage)
    takes = {entry["name"]: (entry, take) for entry, take in _plan(job, data, storage)}
    if shard not in takes:
        raise CacheError(f"{storage.url(data.train)} has no shard {shard!r} in this stage's plan: rerun prepare_data.")
    entry, take = takes[shard]
    name = cache_shard_name(entry["sha256"])
    if store.committed(name):
        return store, name, None, next(e for e in store.shards if e.name == name).__dict__
    if (recorded := store.recorded_entry(name)) is not None:
        return store, name, None, recorded.__dict__
    model = load_model()
    seq_ids, input_ids = read_data_shard(storage, data.train, shard)
    return store, name, job.compute(model, seq_ids[:take], input_ids[:take], entry["sha256"]), None


class ShardWriter:
    """``ShardStore.put_shard`` (Arrow → zstd Parquet, the write, the commit record) on a background
    thread, so the teacher computes the next shard meanwhile. The queue holds at most ``depth``
    computed shards, which bounds the memory; each shard's bytes are what ``put_shard`` writes serially.

    ``put`` raises the writer's error as soon as it is known; ``close`` waits for the queued shards and
    raises the writer's error if there was one. After a failure the writer writes nothing more."""

    _DONE = object()

    def __init__(self, store: ShardStore, depth: int = 1):
        self.store = store
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=f"shard-writer:{store.folder}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self.error is None:
                try:
                    self.store.put_shard(*item)
                except BaseException as e:  # handed to the caller's thread by put / close
                    self.error = e

    def put(self, name: str, table: pa.Table, source: str) -> None:
        self._raise()
        self._queue.put((name, table, source))

    def close(self, *, raise_error: bool = True) -> None:
        self._queue.put(self._DONE)
        self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def commit(job: ShardJob, data: DataRef, storage: Storage) -> CacheRef:
    """List every recorded shard in the manifest (one write); returns the cache ref.

    Raises CacheError, after committing what is there, when some planned shard is still missing
    (its task failed): a rerun computes only those."""
    store = job.ref.open(storage)
    store.commit_recorded()
    names = [cache_shard_name(entry["sha256"]) for entry, _ in _plan(job, data, storage)]
    missing = [n for n in names if not store.committed(n)]
    if missing:
        raise CacheError(
            f"{storage.url(job.ref.folder)} lacks {job.ref.kind} shards for {len(missing)} of {len(names)} train shards "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the {len(names) - len(missing)} "
            f"finished ones are committed. Rerun the cache_{job.ref.kind} stage to compute the missing ones."
        )
    return job.ref


def run_all(
    job: ShardJob, load_model: Callable[[], torch.nn.Module], data: DataRef, storage: Storage, progress: Progress | None = None,
    *, overlap: bool = True,
) -> CacheRef:
    """The whole stage in one process. ``load_model`` is called once, and only when some shard is
    missing, so a finished cache costs no teacher load.

    ``overlap``: each computed shard is encoded, written and recorded on a background thread
    (:class:`ShardWriter`) while the teacher computes the next; the shards are byte-identical to the
    serial path's. If the writer fails, the stage fails with the writer's error and commits nothing;
    the shards recorded before it stay, so a rerun resumes at the first missing one. ``progress``
    counts shards as they are computed."""
    todo = plan(job, data, storage)
    if todo:
        model = None

        def load_once() -> torch.nn.Module:
            nonlocal model
            model = model if model is not None else load_model()
            return model

        total = len(_plan(job, data, storage))
        writer = ShardWriter(job.ref.open(storage)) if overlap else None
        try:
            for i, shard in enumerate(todo):
                if writer is None:
                    run_shard(job, load_once, data, storage, shard)
                else:
                    _, name, table, _ = _compute(job, load_once, data, storage, shard)
                    if table is not None:
                        writer.put(name, table, f"{data.train}/{shard}")
                if progress:
                    progress(total - len(todo) + i + 1, total)
        except BaseException:
            if writer is not None:
                writer.close(raise_error=False)  # the shards computed so far are still written, as serially
            raise
        if writer is not None:
            writer.close()
    return commit(job, data, storage)


def shard_seed(seed: int, data_shard_sha256: str) -> int:
    """A per-shard seed: the same for a shard whatever order or process computes it."""
    return (seed * 1_000_003 + int(data_shard_sha256[:12], 16)) % 2**63
