"""A pointer to a teacher cache, passed between stages as plain JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distill_core.cache.shards import ShardStore, read_manifest
from distill_core.data import DataRef
from distill_core.errors import CacheError
from distill_core.storage import Storage


@dataclass(frozen=True)
class CacheRef:
    kind: str  # "topk" | "samples" | "beams"
    folder: str  # caches/<kind>/<fingerprint>, relative to the storage root
    fingerprint: str
    meta: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheRef":
        return cls(**d)

    def open(self, storage: Storage) -> ShardStore:
        return ShardStore(storage, self.folder, kind=self.kind, fingerprint=self.fingerprint, meta=self.meta)


def teacher_cache_ref(kind: str, settings: dict, teacher: dict, data: DataRef) -> CacheRef:
    """The content address of a teacher cache: its kind and stage settings, the teacher and the
    precision it ran in, tokenizer, sequence length and schema. The data fingerprint is not part of
    it: shards are keyed by their input shard, so a grown dataset reuses the shards it already has."""
    from distill_core.cache.shards import SCHEMA_VERSION
    from distill_core.storage import fingerprint

    meta = {
        "teacher": teacher["source"],
        "teacher_fingerprint": teacher["fingerprint"],
        "teacher_dtype": teacher["dtype"],
        "tokenizer_hash": data.tokenizer_hash,
        "seq_len": data.seq_len,
        "vocab_size": data.vocab_size,
        "schema_version": SCHEMA_VERSION,
        **settings,
    }
    fp = fingerprint({"kind": kind, **meta})
    return CacheRef(kind=kind, folder=f"caches/{kind}/{fp}", fingerprint=fp, meta=meta)


def cache_shard_name(data_shard_sha256: str) -> str:
    """Cache shards are named by the content of the data shard they were computed from, so a grown
    dataset reuses every shard whose input did not change."""
    return f"part-{data_shard_sha256[:16]}.parquet"


def prompt_plan(data_shards: list[dict], rows: int | None) -> list[tuple[dict, int]]:
    """The data shards (in order) that supply the first ``rows`` rows, with how many rows each gives.

    ``rows=None`` takes every row of every shard."""
    plan, left = [], rows
    for entry in data_shards:
        if left is not None and left <= 0:
            break
        take = entry["rows"] if left is None else min(entry["rows"], left)
        plan.append((entry, take))
        left = None if left is None else left - take
    return plan


def shards_for(cache: CacheRef, storage: Storage, data_folder: str, rows: int | None = None) -> list[str]:
    """Names of the cache shards that cover the first ``rows`` rows (default all) of ``data_folder``.

    Raises CacheError when some are missing (the teacher stage did not finish)."""
    store = cache.open(storage)
    plan = prompt_plan(read_manifest(storage, data_folder)["shards"], rows)
    names = [cache_shard_name(entry["sha256"]) for entry, _ in plan]
    missing = [n for n in names if not store.committed(n)]
    if missing:
        raise CacheError(
            f"{storage.url(cache.folder)} lacks {len(missing)} of {len(names)} shards for {data_folder}: "
            f"run the cache_{cache.kind} stage to complete it."
        )
    return names


def check_compatible(cache: CacheRef, data: DataRef, teacher_fingerprint: str) -> None:
    """Refuse a cache made by another teacher or tokenizer, or over other sequence lengths."""
    expected = {"teacher_fingerprint": teacher_fingerprint, "tokenizer_hash": data.tokenizer_hash}
    diffs = [f"{k} is {cache.meta.get(k)!r} in the cache, {v!r} for this run" for k, v in expected.items() if cache.meta.get(k) != v]
    if diffs:
        raise CacheError(
            f"cache {cache.folder} was made for something else: {'; '.join(diffs)}. "
            "Rerun the teacher stage for this teacher and data."
        )
