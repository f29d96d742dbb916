"""Recompute what was damaged on disk: shards whose bytes no longer match their manifest checksum.

Readers refuse a damaged shard (``read_shard`` raises CacheError). On request (a stage run with
``recompute_damaged=True``, or ``distillery repair-cache``) :func:`repair_damaged` drops the damaged
shards of a run's data and teacher caches; prepared data is rewritten at once (tokenizing is cheap
and deterministic) and the teacher stage then recomputes exactly the dropped cache shards. Intact
shards are never rewritten.
"""

from __future__ import annotations

from typing import Callable

from distill_core.cache.ref import CacheRef
from distill_core.cache.shards import drop_damaged_shards
from distill_core.config import DataConfig
from distill_core.data import DataRef, prepare_data
from distill_core.errors import DataError
from distill_core.storage import Storage


def repair_damaged(
    storage: Storage, data: DataRef, data_cfg: DataConfig, load_tokenizer: Callable[[], object], caches: list[CacheRef],
) -> dict[str, list[str]]:
    """Drop damaged shards of ``data`` (then rewrite them) and of each cache; returns {folder: names dropped}."""
    dropped = {}
    for folder in (data.train, data.validation):
        if names := drop_damaged_shards(storage, folder):
            dropped[folder] = names
    if dropped:
        rebuilt = prepare_data(data_cfg, load_tokenizer(), data.tokenizer_hash, storage)
        if rebuilt.folder != data.folder:
            raise DataError(
                f"{storage.url(data.folder)} had damaged shards, but data.source now gives other documents "
                f"({rebuilt.folder}), so they cannot be rebuilt: start a new run on the current data."
            )
    for cache in caches:
        if storage.exists(f"{cache.folder}/manifest.json") and (names := drop_damaged_shards(storage, cache.folder)):
            dropped[cache.folder] = names
    return dropped
