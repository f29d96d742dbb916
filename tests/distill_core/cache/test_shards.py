import json

import numpy as np
import pyarrow as pa
import pytest

from distill_core.cache.shards import SCHEMA_VERSION, ShardStore, list_array, read_manifest
from distill_core.errors import CacheError
from distill_core.storage import Storage


def _table(n=4, start=0):
    return pa.table({"seq_id": pa.array(np.arange(start, start + n), pa.int64()),
                     "ids": list_array(np.arange(n * 3, dtype=np.uint16).reshape(n, 3), pa.uint16())})


def _store(storage, meta=None):
    return ShardStore(storage, "caches/x/fp", kind="topk", fingerprint="fp", meta=meta or {"k": 3, "teacher": "t"})


def test_round_trip_and_manifest(tmp_path):
    storage = Storage(str(tmp_path))
    store = _store(storage)
    entry = store.write_shard("part-a.parquet", _table(), source="data/a")
    assert entry.rows == 4 and len(entry.sha256) == 64
    again = _store(storage)
    assert again.committed("part-a.parquet")
    table = again.read_shard("part-a.parquet")
    assert table["ids"].type == pa.list_(pa.uint16())
    assert table["ids"].to_pylist()[1] == [3, 4, 5]
    manifest = read_manifest(storage, "caches/x/fp")
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["meta"]["k"] == 3


def test_uncommitted_file_is_invisible_and_overwritten(tmp_path):
    storage = Storage(str(tmp_path))
    store = _store(storage)
    storage.write_bytes("caches/x/fp/part-a.parquet", b"half a shard")  # a killed writer's leftover
    assert not store.committed("part-a.parquet")
    store.write_shard("part-a.parquet", _table())
    assert store.read_shard("part-a.parquet").num_rows == 4


def test_other_settings_are_refused_with_the_difference(tmp_path):
    storage = Storage(str(tmp_path))
    _store(storage).write_shard("part-a.parquet", _table())
    with pytest.raises(CacheError, match=r"meta\.k is 3 there, 5 here"):
        _store(storage, {"k": 5, "teacher": "t"})


def test_damaged_shard_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    _store(storage).write_shard("part-a.parquet", _table())
    path = tmp_path / "caches/x/fp/part-a.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match="checksum"):
        _store(storage).read_shard("part-a.parquet")


def test_newer_schema_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    _store(storage).write_shard("part-a.parquet", _table())
    path = tmp_path / "caches/x/fp/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"newer than this code's .*written by distillery .*Install that version "
                                         r"\(or a later one\) to use it, or point storage.root at another folder"):
        _store(storage)


def test_missing_manifest_names_both_causes(tmp_path):
    with pytest.raises(CacheError, match=r"has not finished, or its output was deleted since.*--refresh-cache"):
        read_manifest(Storage(str(tmp_path)), "data/fp/train")


def test_shard_of_a_foreign_layout_is_refused_naming_columns_and_fix(tmp_path):
    """A Parquet file whose checksum the manifest lists, but with other columns than its reader needs."""
    storage = Storage(str(tmp_path))
    store = _store(storage)
    foreign = pa.table({"seq_id": pa.array([0, 1], pa.int64()), "input_ids": list_array(np.zeros((2, 3), np.uint16), pa.uint16())})
    store.write_shard("part-a.parquet", foreign)
    url = storage.url("caches/x/fp/part-a.parquet")
    with pytest.raises(CacheError) as err:
        _store(storage).read_shard("part-a.parquet", ("seq_id", "ids", "logprobs", "tail_logprob"))
    assert str(err.value).startswith(
        f"shard {url} has the columns ['seq_id', 'input_ids'], but its reader needs "
        "['seq_id', 'ids', 'logprobs', 'tail_logprob'] (missing ['ids', 'logprobs', 'tail_logprob'])")
    assert f"Delete {url}, then run `distillery repair-cache CONFIG --run-id RUN_ID`" in str(err.value)
    assert _store(storage).read_shard("part-a.parquet", ("seq_id",)).num_rows == 2


def test_complete_store_takes_no_new_shards(tmp_path):
    storage = Storage(str(tmp_path))
    store = _store(storage)
    store.write_shard("part-a.parquet", _table())
    store.finalize()
    with pytest.raises(CacheError, match="immutable"):
        store.write_shard("part-b.parquet", _table())


def test_parquet_bytes_are_deterministic(tmp_path):
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    ea = _store(a).write_shard("p.parquet", _table())
    eb = _store(b).write_shard("p.parquet", _table())
    assert ea.sha256 == eb.sha256
