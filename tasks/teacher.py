"""Teacher tasks: resolve (and convert) the teacher, precompute its outputs into caches."""

from __future__ import annotations

from prefect import task

from distill_core.config import RunConfig, StorageConfig, TeacherConfig, TopKConfig
from distill_core.data import DataRef
from distill_core.preflight import check_run
from distill_core.teacher.load import TeacherRef, load_teacher, resolve_teacher as _resolve
from distill_core.teacher.topk import cache_topk as _cache_topk
from distill_core.train import resolve_device
from tasks.common import CONTENT, progress_reporter, storage_of


@task(name="resolve-teacher", cache_policy=CONTENT, persist_result=True, retries=1)
def resolve_teacher(teacher: TeacherConfig, storage: StorageConfig) -> dict:
    """Locate the teacher, convert it to safetensors once if needed; returns its TeacherRef."""
    return _resolve(teacher, storage_of(storage)).to_dict()


@task(name="preflight")
def preflight(config: RunConfig, teacher: dict) -> None:
    """Fail fast on settings that cannot work with this teacher, before any expensive stage."""
    check_run(config, TeacherRef.from_dict(teacher))


@task(name="cache-topk", cache_policy=CONTENT, persist_result=True, retries=2, retry_delay_seconds=5)
def cache_topk(teacher: dict, data: dict, cfg: TopKConfig, storage: StorageConfig) -> dict:
    """Top-k soft targets for every train shard; a rerun computes only missing shards."""
    root = storage_of(storage)
    ref = TeacherRef.from_dict(teacher)
    device = resolve_device("auto")
    load = lambda: load_teacher(ref, root, device=device)[0]  # noqa: E731
    progress = progress_reporter(f"cache-topk-{ref.fingerprint}", "teacher top-k shards written")
    return _cache_topk(load, DataRef.from_dict(data), teacher, cfg, root, progress).to_dict()
