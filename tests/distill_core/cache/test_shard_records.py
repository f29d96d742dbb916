"""Many writers of one shard folder: shard + commit record each, one manifest write at the end."""

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from distill_core.cache.shards import RECORD_SUFFIX, ShardStore, read_manifest
from distill_core.errors import CacheError
from distill_core.storage import Storage


def _store(storage):
    return ShardStore(storage, "caches/x/fp", kind="topk", fingerprint="fp", meta={"k": 4})


def _table(i: int) -> pa.Table:
    return pa.table({"seq_id": pa.array([i, i + 100], pa.int64())})


def test_concurrent_writers_lose_no_entry_and_readers_see_only_committed_shards(tmp_path):
    storage = Storage(str(tmp_path))
    names = [f"part-{i:02d}.parquet" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:  # each writer opens its own store, as shard tasks do
        entries = list(pool.map(lambda i: _store(storage).put_shard(names[i], _table(i), source=f"d/{i}"), range(8)))
    assert not storage.exists("caches/x/fp/manifest.json")  # recorded, not yet committed
    assert _store(storage).recorded() == set(names)

    assert {e.name for e in _store(storage).commit_recorded()} == set(names)
    reader = _store(storage)
    assert [s.name for s in reader.shards] == names
    assert {s.sha256 for s in reader.shards} == {e.sha256 for e in entries}
    assert reader.read_shard(names[3])["seq_id"].to_pylist() == [3, 103]
    assert _store(storage).commit_recorded() == []  # idempotent
    with pytest.raises(CacheError, match="already committed"):
        reader.put_shard(names[0], _table(0))


def test_a_record_whose_shard_is_gone_is_dropped_so_the_shard_is_recomputed(tmp_path):
    storage = Storage(str(tmp_path))
    store = _store(storage)
    store.put_shard("part-a.parquet", _table(1))
    store.put_shard("part-b.parquet", _table(2))
    storage.remove("caches/x/fp/part-b.parquet")
    assert [e.name for e in _store(storage).commit_recorded()] == ["part-a.parquet"]
    assert [s["name"] for s in read_manifest(storage, "caches/x/fp")["shards"]] == ["part-a.parquet"]
    assert not storage.exists("caches/x/fp/part-b.parquet" + RECORD_SUFFIX)


def test_records_heal_a_manifest_that_lost_entries(tmp_path):
    storage = Storage(str(tmp_path))
    store = _store(storage)
    for name in ("part-a.parquet", "part-b.parquet"):
        store.put_shard(name, _table(0))
    store.commit_recorded()
    manifest = storage.read_json("caches/x/fp/manifest.json")
    manifest["shards"] = manifest["shards"][:1]  # as if a racing commit overwrote it
    storage.write_json("caches/x/fp/manifest.json", manifest)
    assert [e.name for e in _store(storage).commit_recorded()] == ["part-b.parquet"]
    assert len(_store(storage).shards) == 2
