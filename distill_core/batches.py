"""Training batches from prepared data and teacher caches, in a deterministic, resumable order.

The order of rows is a pure function of (seed, epoch): shards are visited in a seeded permutation
and rows within a shard in another, so a resumed run that skips the first ``n`` batches sees
exactly the batches an uninterrupted run would. Only one shard is held in memory at a time.
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
from distill_core.losses.signals import TopKTargets
from distill_core.storage import Storage
from distill_core.teacher.topk import read_topk_table


@dataclass
class Batch:
    """input_ids int64 [B, T]; loss_mask bool [B, T-1]: positions whose next token is trained on;
    targets: the teacher's top-k over the same T-1 positions, or None."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    targets: TopKTargets | None = None

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.loss_mask.to(device), self.targets.to(device) if self.targets else None)


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

    def batches(self, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        rows = self.rows(skip_batches * batch_size)
        while True:
            chunk = [next(rows) for _ in range(batch_size)]
            yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


def topk_stream(storage: Storage, data: DataRef, cache: CacheRef | None, seed: int) -> RowStream:
    """Rows of packed train sequences, joined with their top-k targets when ``cache`` is given."""
    entries = read_manifest(storage, data.train)["shards"]
    cache_names = shards_for(cache, storage, data.train) if cache else [None] * len(entries)
    store = cache.open(storage) if cache else None

    def loader(data_name: str, cache_name: str | None) -> ShardLoader:
        def load() -> dict[str, np.ndarray]:
            seq_ids, input_ids = read_data_shard(storage, data.train, data_name)
            out = {"input_ids": input_ids}
            if cache_name is not None:
                c_seq, ids, lps, tail = read_topk_table(store.read_shard(cache_name), cache.meta["k"])
                if not np.array_equal(c_seq, seq_ids):
                    raise CacheError(f"{cache.folder}/{cache_name} rows do not match {data.train}/{data_name}: recompute the cache.")
                out.update(topk_ids=ids, topk_logprobs=lps, tail_logprob=tail)
            return out

        return load

    loaders = [loader(e["name"], c) for e, c in zip(entries, cache_names)]
    return RowStream(loaders, [e["rows"] for e in entries], seed)


def to_batch(arrays: dict[str, np.ndarray]) -> Batch:
    input_ids = torch.from_numpy(arrays["input_ids"])
    mask = torch.ones(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.bool)
    targets = None
    if "topk_ids" in arrays:
        targets = TopKTargets(
            torch.from_numpy(arrays["topk_ids"]), torch.from_numpy(arrays["topk_logprobs"]), torch.from_numpy(arrays["tail_logprob"])
        )
    return Batch(input_ids, mask, targets)
