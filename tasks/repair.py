"""Repair task: drop (and for data, rewrite) shards that fail their checksum, so the stage recomputes them."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from distill_core.cache.repair import repair_damaged as _repair
from distill_core.config import RunConfig
from distill_core.data import DataRef
from distill_core.teacher.load import TeacherRef, load_tokenizer
from distill_core.teacher.jobs import job_for, stage_config
from tasks.common import storage_of


@task(name="repair-damaged", task_run_name="repair-{kind}")
def repair_damaged(config: RunConfig, teacher: dict, data: dict, kind: str) -> dict[str, list[str]]:
    """Verify the run's data and ``kind`` cache shards; forget the damaged ones. Returns {folder: names}."""
    root, ref, data_ref = storage_of(config.storage), TeacherRef.from_dict(teacher), DataRef.from_dict(data)
    cache = job_for(kind, stage_config(config, kind), teacher, data_ref).ref
    dropped = _repair(root, data_ref, config.data, lambda: load_tokenizer(ref, root), [cache])
    logger = get_run_logger()
    for folder, names in dropped.items():
        logger.warning("%s: %d damaged shard(s) dropped for recomputation: %s", folder, len(names), ", ".join(names))
    if not dropped:
        logger.info("every shard matches its checksum; nothing to recompute")
    return dropped
