"""Data task: source → tokenized, packed train/validation shards."""

from __future__ import annotations

from prefect import task

from distill_core.config import DataConfig, StorageConfig
from distill_core.data import prepare_data as _prepare
from distill_core.teacher.load import TeacherRef, load_tokenizer
from tasks.common import CONTENT, storage_of, transient


@task(name="prepare-data", cache_policy=CONTENT, persist_result=True, retries=1, retry_condition_fn=transient)
def prepare_data(cfg: DataConfig, teacher: dict, storage: StorageConfig) -> dict:
    root = storage_of(storage)
    ref = TeacherRef.from_dict(teacher)
    return _prepare(cfg, load_tokenizer(ref, root), ref.tokenizer_hash, root).to_dict()
