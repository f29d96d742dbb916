import pytest

from distill_core.cache import stage
from distill_core.cache.shards import ShardStore
from distill_core.config import TopKConfig
from distill_core.storage import Storage
from distill_core.teacher.topk import topk_job

TEACHER = {"source": "path:tiny", "fingerprint": "t" * 16, "dtype": "float32"}


def _copy(storage: Storage, data, tmp_path, name: str) -> Storage:
    other = Storage(str(tmp_path / name))
    other.upload_dir(storage.local_path(data.folder), data.folder)
    return other


def _files(storage: Storage, folder: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(f"{folder}/{name}") for name in storage.listdir(folder) if name.endswith(".parquet")}


def test_overlapped_stage_writes_the_serial_bytes(prepared, tiny_teacher, tmp_path):
    storage, data = prepared
    job = topk_job(TopKConfig(k=5, batch_size=3), TEACHER, data)
    serial_storage = _copy(storage, data, tmp_path, "serial")
    overlapped = stage.run_all(job, lambda: tiny_teacher, data, storage, overlap=True)
    serial = stage.run_all(job, lambda: tiny_teacher, data, serial_storage, overlap=False)
    files = _files(storage, overlapped.folder)
    assert len(files) == 3 and files == _files(serial_storage, serial.folder)
    assert [s.__dict__ for s in overlapped.open(storage).shards] == [s.__dict__ for s in serial.open(serial_storage).shards]


def test_a_failing_writer_fails_the_stage_with_its_error_and_commits_nothing(prepared, tiny_teacher, tmp_path, monkeypatch):
    storage, data = prepared
    job = topk_job(TopKConfig(k=4), TEACHER, data)
    real_put = ShardStore.put_shard
    calls = []

    def put_then_fail(self, name, table, source=""):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full while writing the second shard")
        return real_put(self, name, table, source)

    monkeypatch.setattr(ShardStore, "put_shard", put_then_fail)
    with pytest.raises(OSError, match="disk full while writing the second shard"):
        stage.run_all(job, lambda: tiny_teacher, data, storage)
    store = job.ref.open(storage)
    assert store.shards == [] and not store.complete  # nothing committed
    assert store.recorded() == {calls[0]}  # the shard written before the failure stays, uncommitted
    assert not storage.exists(f"{job.ref.folder}/{calls[1]}")  # the failed one left no file to trust

    monkeypatch.setattr(ShardStore, "put_shard", real_put)
    resumed = []

    def compute_counted(model, seq_ids, input_ids, data_sha):
        resumed.append(data_sha)
        return job.compute(model, seq_ids, input_ids, data_sha)

    import dataclasses

    ref = stage.run_all(dataclasses.replace(job, compute=compute_counted), lambda: tiny_teacher, data, storage)
    assert len(resumed) == 2  # resumes at the first missing shard
    reference = stage.run_all(job, lambda: tiny_teacher, data, _copy(storage, data, tmp_path, "reference"), overlap=False)
    assert [s.sha256 for s in ref.open(storage).shards] == [s.sha256 for s in reference.open(Storage(str(tmp_path / "reference"))).shards]


def test_a_failing_teacher_still_writes_the_shards_computed_before_it(prepared, tiny_teacher):
    storage, data = prepared
    job = topk_job(TopKConfig(k=4), TEACHER, data)
    computed = []

    def compute_then_die(model, seq_ids, input_ids, data_sha):
        if computed:
            raise RuntimeError("teacher died")
        computed.append(data_sha)
        return job.compute(model, seq_ids, input_ids, data_sha)

    import dataclasses

    with pytest.raises(RuntimeError, match="teacher died"):
        stage.run_all(dataclasses.replace(job, compute=compute_then_die), lambda: tiny_teacher, data, storage)
    store = job.ref.open(storage)
    assert store.shards == [] and len(store.recorded()) == 1
