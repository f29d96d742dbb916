"""The pipeline on S3: a real S3 endpoint on loopback (moto's server), not a patched client."""

import socket
import uuid

import pytest
import s3fs
from transformers import AutoModelForCausalLM

import distill_core.teacher.topk as topk
import tasks.teacher
from distill_core.cache.ref import CacheRef
from distill_core.cache.shards import RECORD_SUFFIX, read_manifest, read_shard
from distill_core.config import StorageConfig
from distill_core.errors import CacheError
from distill_core.registry import get_version
from distill_core.storage import Storage
from flows.nightly import nightly
from flows.runners import RESULTS_FOLDER
from flows.stages import cache_topk_flow, prepare_data_flow


def _s3_config(base, endpoint: str, **extra_options):
    """``base`` with its storage root in a fresh bucket on ``endpoint``."""
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", **extra_options}
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir(bucket)
    return base.model_copy(update={"storage": StorageConfig(root=f"s3://{bucket}/root", options=options)})


def test_nightly_on_s3_registers_a_model_that_downloads_and_loads(tiny_config, tiny_teacher_dir, s3_server, tmp_path):
    config = _s3_config(tiny_config, s3_server)
    storage = Storage(config.storage.root, config.storage.options)
    # The teacher is read from the bucket too (a PathTeacher may be any fsspec URL).
    storage.upload_dir(tiny_teacher_dir, "teacher-src")
    config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"path": storage.url("teacher-src")})})

    result = nightly(config, run_id="s3-night")

    registered = result["registered"]
    assert registered["version"] == 1 and registered["champion"]
    assert registered["url"].startswith(config.storage.root + "/registry/")
    entry = get_version(storage, "tiny", 1)
    model = AutoModelForCausalLM.from_pretrained(storage.download_dir(entry["path"], tmp_path / "model"))
    assert model.config.n_layer == 2
    assert not (tmp_path / "root").exists()  # tiny_config's local root was never used
    # Every artifact is in the bucket, and Prefect's persisted task results are beside them.
    cache = CacheRef.from_dict(storage.read_json("runs/s3-night/stages/cache_topk.json"))
    assert len(read_manifest(storage, cache.folder)["shards"]) == 3
    assert storage.exists("runs/s3-night/stages/register.json")
    assert storage.fs.find(storage.url(RESULTS_FOLDER)), "no Prefect result was persisted on S3"
    # the checkpoints were deleted from the bucket once each final model was committed
    students = storage.fs.find(storage.url("students"))
    assert any(p.endswith("/model/train.json") for p in students) and not [p for p in students if "/checkpoints/" in p]


# -- faults ----------------------------------------------------------------------------------------
@pytest.fixture
def restartable_s3(s3_server):
    """A second moto server that a test may stop and start again (moto keeps buckets in-process)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()  # idempotent


def test_s3_outage_mid_shard_fails_the_stage_and_the_rerun_completes_only_missing_shards(
    tiny_config, restartable_s3, monkeypatch
):
    server, endpoint = restartable_s3
    # Fail fast at the client (one attempt, short timeouts) so the task retries are what is exercised.
    config = _s3_config(
        tiny_config, endpoint,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
    )
    storage = Storage(config.storage.root, config.storage.options)
    prepare_data_flow(run_id="outage", config=config)
    for t in (tasks.teacher.plan_cache, tasks.teacher.cache_shard, tasks.teacher.commit_cache):
        monkeypatch.setattr(t, "retry_delay_seconds", [0.1])

    computed, outage = [], []
    real_table = topk._topk_table

    def table_then_outage(*args, **kwargs):
        table = real_table(*args, **kwargs)
        computed.append(table.num_rows)
        if len(computed) == 2 and not outage:  # the 2nd shard is computed, not yet written: the endpoint goes away
            outage.append(True)
            server.stop()
        return table

    monkeypatch.setattr(topk, "_topk_table", table_then_outage)
    with pytest.raises(Exception) as failure:
        cache_topk_flow(run_id="outage", config=config)
    summary = _find(failure.value, CacheError)  # possibly wrapped by errors of cleanup on the dead endpoint
    assert summary is not None, repr(failure.value)
    assert "2 of 3 topk shard tasks failed after their retries" in str(summary)
    assert "Could not connect to the endpoint URL" in str(summary)
    assert len(computed) == 2  # the failing shard's retries died on storage before computing again

    server.start()  # same port; moto keeps its buckets in-process, so the data is still there
    # The dead endpoint kept the failed run from releasing its run lock, and this process (its
    # holder) is alive, so the lock is not stale: remove it, as its error message says to.
    storage.remove("runs/outage/.lock")
    data = storage.read_json("runs/outage/stages/prepare_data.json")
    cache_folder = topk.topk_cache_ref(config.topk, storage.read_json("runs/outage/stages/teacher.json"),
                                       _data_ref(data)).folder
    names = storage.listdir(cache_folder)
    # Only the first shard finished: its shard and commit record exist, and nothing lists a partial one.
    assert len([n for n in names if n.endswith(RECORD_SUFFIX)]) == 1
    if storage.exists(f"{cache_folder}/manifest.json"):
        for entry in read_manifest(storage, cache_folder)["shards"]:
            read_shard(storage, cache_folder, _entry(entry))  # checksum verified

    computed.clear()
    cache = cache_topk_flow(run_id="outage", config=config)
    assert len(computed) == 2  # the two missing shards only
    manifest = read_manifest(storage, cache["folder"])
    assert len(manifest["shards"]) == 3
    for entry in manifest["shards"]:
        read_shard(storage, cache["folder"], _entry(entry))


def _find(exc, kind):
    """``exc`` or the first exception of type ``kind`` in its cause/context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _data_ref(d):
    from distill_core.data import DataRef

    return DataRef.from_dict(d)


def _entry(d):
    from distill_core.cache.shards import ShardEntry

    return ShardEntry(**d)
