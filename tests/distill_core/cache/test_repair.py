import numpy as np
import pyarrow as pa

from distill_core.cache.ref import CacheRef
from distill_core.cache.repair import repair_damaged
from distill_core.cache.shards import ShardStore, drop_damaged_shards, list_array, read_manifest
from distill_core.config import DataConfig
from distill_core.data import prepare_data
from distill_core.storage import Storage


def _table(start):
    return pa.table({"seq_id": pa.array(np.arange(start, start + 4), pa.int64()),
                     "ids": list_array(np.arange(12, dtype=np.uint16).reshape(4, 3) + start, pa.uint16())})


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:-10])
    else:  # one byte edited, same size
        edited = bytearray(data)
        edited[len(edited) // 2] ^= 0xFF
        path.write_bytes(bytes(edited))


def test_damaged_shards_are_dropped_and_intact_ones_kept(tmp_path):
    storage = Storage(str(tmp_path))
    store = ShardStore(storage, "caches/x/fp", "topk", "fp", {"k": 3})
    for i, name in enumerate(["part-a.parquet", "part-b.parquet", "part-c.parquet"]):
        store.write_shard(name, _table(10 * i))
    store.finalize()
    folder = tmp_path / "caches/x/fp"
    _damage(folder / "part-a.parquet", "truncate")
    _damage(folder / "part-b.parquet", "edit")
    intact = (folder / "part-c.parquet").stat().st_mtime_ns

    assert drop_damaged_shards(storage, "caches/x/fp") == ["part-a.parquet", "part-b.parquet"]
    manifest = read_manifest(storage, "caches/x/fp")
    assert [s["name"] for s in manifest["shards"]] == ["part-c.parquet"] and not manifest["complete"]
    assert not (folder / "part-a.parquet").exists() and not (folder / "part-b.parquet").exists()
    assert (folder / "part-c.parquet").stat().st_mtime_ns == intact
    before = (folder / "manifest.json").stat().st_mtime_ns
    assert drop_damaged_shards(storage, "caches/x/fp") == []  # nothing left to drop, nothing rewritten
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def test_recorded_but_uncommitted_damaged_shard_loses_its_record(tmp_path):
    storage = Storage(str(tmp_path))
    store = ShardStore(storage, "caches/x/fp", "topk", "fp", {"k": 3})
    store.write_shard("part-a.parquet", _table(0))
    store.put_shard("part-b.parquet", _table(10))  # written by a shard task, not yet committed
    _damage(tmp_path / "caches/x/fp/part-b.parquet", "edit")
    assert drop_damaged_shards(storage, "caches/x/fp") == ["part-b.parquet"]
    assert ShardStore(storage, "caches/x/fp", "topk", "fp", {"k": 3}).recorded() == set()


def test_repair_rewrites_damaged_data_identically_and_drops_damaged_cache_shards(tmp_path, tiny_tokenizer):
    storage = Storage(str(tmp_path))
    cfg = DataConfig(seq_len=16, rows_per_shard=8, max_train_sequences=24, max_validation_sequences=4)
    data = prepare_data(cfg, tiny_tokenizer, "tok", storage)
    shard = tmp_path / data.train / "part-00001.parquet"
    original = shard.read_bytes()
    _damage(shard, "truncate")
    cache = CacheRef("topk", "caches/topk/c", "c", {"k": 3})
    cache.open(storage).write_shard("part-a.parquet", _table(0))
    _damage(tmp_path / "caches/topk/c/part-a.parquet", "edit")

    dropped = repair_damaged(storage, data, cfg, lambda: tiny_tokenizer, [cache])
    assert dropped == {data.train: ["part-00001.parquet"], cache.folder: ["part-a.parquet"]}
    assert shard.read_bytes() == original and read_manifest(storage, data.train)["complete"]
    assert repair_damaged(storage, data, cfg, lambda: tiny_tokenizer, [cache]) == {}
