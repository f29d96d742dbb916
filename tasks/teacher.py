"""Teacher tasks: resolve (and convert) the teacher, precompute its outputs into caches."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_core.cache import stage
from distill_core.config import BeamsConfig, RunConfig, SamplesConfig, StorageConfig, TeacherConfig, TopKConfig
from distill_core.data import DataRef
from distill_core.errors import CacheError, DistilleryError
from distill_core.preflight import check_run, check_stage
from distill_core.teacher.load import TeacherRef, load_teacher, resolve_teacher as _resolve
from distill_core.teacher.jobs import job_for
from distill_core.train import resolve_device
from tasks.common import CONTENT, storage_of, transient


@task(name="resolve-teacher", cache_policy=CONTENT, persist_result=True, retries=1, retry_condition_fn=transient)
def resolve_teacher(teacher: TeacherConfig, storage: StorageConfig) -> dict:
    """Locate the teacher, convert it to safetensors once if needed; returns its TeacherRef."""
    return _resolve(teacher, storage_of(storage)).to_dict()


@task(name="preflight")
def preflight(config: RunConfig, teacher: dict) -> None:
    """Fail fast on settings that cannot work with this teacher, before any expensive stage."""
    check_run(config, TeacherRef.from_dict(teacher))


# -- teacher caches (top-k, samples, beams), one task per shard: what the cache flows map ----------
StageConfig = TopKConfig | SamplesConfig | BeamsConfig

# A concurrency limit on this tag caps how many shard tasks hold a GPU at once, across every flow
# run and worker: `prefect concurrency-limit create teacher-gpu 4` (stored as the global concurrency
# limit `tag:teacher-gpu`). Without a limit the tag does nothing.
GPU_TAG = "teacher-gpu"


_teacher_lock = threading.Lock()
_teacher: dict = {}  # {"key": ..., "model": ...}: the last teacher loaded in this process


def _shard_teacher(ref: TeacherRef, root) -> Callable[[], torch.nn.Module]:
    """A loader that keeps one teacher per process, so the shards a worker runs load it once."""

    def load() -> torch.nn.Module:
        device = resolve_device("auto")
        key = (ref.fingerprint, ref.dtype, root.url(), str(device))
        with _teacher_lock:
            if _teacher.get("key") != key:
                _teacher.clear()  # drop the previous teacher before loading the next
                _teacher.update(key=key, model=load_teacher(ref, root, device=device, dtype=getattr(torch, ref.dtype))[0])
            return _teacher["model"]

    return load


def _release_teacher() -> None:
    # Task functions call helpers like this one rather than touching the lock: Dask pickles a task
    # function by value, with the module globals it names, and a lock does not pickle.
    with _teacher_lock:
        _teacher.clear()


@task(name="plan-cache", task_run_name="plan-{kind}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def plan_cache(kind: str, teacher: dict, data: dict, cfg: StageConfig, storage: StorageConfig) -> list[str]:
    """Train data shards that still need this cache's teacher work (neither committed nor recorded)."""
    check_stage(kind, cfg, teacher["vocab_size"])
    return stage.plan(job_for(kind, cfg, teacher, DataRef.from_dict(data)), DataRef.from_dict(data), storage_of(storage))


@task(
    name="cache-shard", task_run_name="cache-{kind}-{shard}", tags=[GPU_TAG], cache_policy=NO_CACHE,
    retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=transient,
)
def cache_shard(kind: str, teacher: dict, data: dict, cfg: StageConfig, storage: StorageConfig, shard: str) -> dict:
    """One cache shard for one train data shard, written with its commit record (not yet in the manifest)."""
    root = storage_of(storage)
    load = _shard_teacher(TeacherRef.from_dict(teacher), root)
    data_ref = DataRef.from_dict(data)
    return stage.run_shard(job_for(kind, cfg, teacher, data_ref), load, data_ref, root, shard)


@task(name="commit-cache", task_run_name="commit-{kind}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def commit_cache(kind: str, teacher: dict, data: dict, cfg: StageConfig, storage: StorageConfig, written: list) -> dict:
    """Commit every recorded shard in one manifest write. ``written`` holds each shard task's entry, or
    its exception when it failed after its retries (the flow passes them with ``allow_failure``)."""
    _release_teacher()  # the shard tasks in this process are done: free the teacher for training
    failed = [w for w in written if isinstance(w, BaseException)]
    user_error = next((w for w in failed if isinstance(w, DistilleryError)), None)
    if user_error is not None:
        # Rerunning the stage would fail the same way: the shard's own message names the fix.
        raise type(user_error)(f"{len(failed)} of {len(written)} {kind} shard tasks failed, one with: {user_error}") from user_error
    if failed:
        # Nothing to commit for readers (they need every shard); finished shards keep their records,
        # so the rerun computes only these.
        raise CacheError(
            f"{len(failed)} of {len(written)} {kind} shard tasks failed after their retries; the first with "
            f"{type(failed[0]).__name__}: {failed[0]}. Finished shards are kept; rerun the cache_{kind} stage "
            "to compute the rest."
        ) from failed[0]
    data_ref = DataRef.from_dict(data)
    return stage.commit(job_for(kind, cfg, teacher, data_ref), data_ref, storage_of(storage)).to_dict()


@task(name="topk-fidelity", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def topk_fidelity(teacher: dict, data: dict, cfg: TopKConfig, storage: StorageConfig, sequences: int = 16) -> dict:
    """The top-k fidelity report on the first ``sequences`` train sequences (before a long capture):
    saved as ``reports/fidelity/<top-k cache fingerprint>.json`` and as the ``topk-fidelity`` artifact."""
    from prefect.artifacts import create_markdown_artifact

    from distill_core.data import first_train_sequences
    from distill_core.teacher.fidelity import fidelity_markdown, fidelity_report
    from distill_core.teacher.topk import topk_cache_ref
    from tasks.common import artifact_key

    check_stage("topk", cfg, teacher["vocab_size"])
    root, data_ref = storage_of(storage), DataRef.from_dict(data)
    input_ids = first_train_sequences(root, data_ref, sequences)
    model = _shard_teacher(TeacherRef.from_dict(teacher), root)()
    report = fidelity_report(model, np.arange(len(input_ids)), input_ids, cfg, data_ref.train_rows * (data_ref.seq_len - 1))
    ref = topk_cache_ref(cfg, teacher, data_ref)
    root.write_json(f"reports/fidelity/{ref.fingerprint}.json", report)
    create_markdown_artifact(markdown=fidelity_markdown(report), key=artifact_key("topk-fidelity"),
                             description=f"top-k strategies on {report['positions']} positions before capture")
    return report
