"""Sharded teacher work on Dask: the same bytes as one process."""

from distill_core.cache.shards import read_manifest
from distill_core.config import RunnerConfig
from distill_core.data import DataRef
from distill_core.storage import Storage
from distill_core.teacher.load import TeacherRef, load_teacher
from distill_core.teacher.topk import cache_topk
from flows.runners import configured
from flows.stages import cache_topk_flow, prepare_data_flow


def _shards(storage: Storage, folder: str) -> dict[str, bytes]:
    return {s["name"]: storage.read_bytes(f"{folder}/{s['name']}") for s in read_manifest(storage, folder)["shards"]}


def test_topk_on_a_local_dask_cluster_of_two_workers_writes_the_single_process_bytes(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"runner": RunnerConfig(kind="dask", workers=2, processes=True)})
    prepare_data_flow(run_id="dask", config=config)
    cache = configured(cache_topk_flow, config)(run_id="dask", config=config)

    # The same stage in one process (the library's whole-stage loop) over a copy of the same data.
    storage = Storage(config.storage.root)
    teacher = storage.read_json("runs/dask/stages/teacher.json")
    data = DataRef.from_dict(storage.read_json("runs/dask/stages/prepare_data.json"))
    single = Storage(str(tmp_path / "single"))
    single.upload_dir(storage.local_path(data.folder), data.folder)
    ref = cache_topk(lambda: load_teacher(TeacherRef.from_dict(teacher), single)[0], data, teacher, config.topk, single)

    expected, found = _shards(single, ref.folder), _shards(storage, cache["folder"])
    assert ref.folder == cache["folder"] and len(expected) == 3
    assert found == expected  # same shard names (input content) and byte-identical Parquet
