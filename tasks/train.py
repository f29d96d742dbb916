"""Training task: one student (KD or CE-only baseline) from the teacher, data and caches."""

from __future__ import annotations

import os
from dataclasses import asdict

from prefect import task
from prefect.logging import get_run_logger

from distill_core.cache.ref import CacheRef
from distill_core.config import LossTerm, StorageConfig, StudentConfig, TrainConfig
from distill_core.data import DataRef
from distill_core.teacher.load import TeacherRef
from distill_core.train import train_student as _train
from tasks.common import CONTENT, progress_reporter, storage_of, transient

# Test hook for fault injection: with DISTILLERY_FAIL_AT_STEP=N set, training raises right after
# step N (after that step's checkpoint, if one falls there). Never set it in production.
FAIL_AT_STEP_ENV = "DISTILLERY_FAIL_AT_STEP"


@task(name="train-student", cache_policy=CONTENT, persist_result=True, retries=1, retry_condition_fn=transient,
      task_run_name="train-{name}")
def train_student(
    name: str, terms: list[LossTerm], student: StudentConfig, train: TrainConfig, storage: StorageConfig,
    teacher: dict, data: dict, caches: dict[str, dict],
) -> dict:
    """Train and save one student on the caches its terms need ({kind: CacheRef dict}); a rerun
    resumes from its latest checkpoint."""
    logger = get_run_logger()
    bar = progress_reporter(f"train-{name}-{teacher['fingerprint']}", f"{name} training steps")
    every = max(1, train.steps // 10)

    def progress(step: int, total: int, record: dict) -> None:
        bar(step, total)
        if step % every == 0 or step == total:
            logger.info("%s step %d/%d %s", name, step, total, {k: round(v, 4) for k, v in record.items() if k != "step"})

    result = _train(name, terms, student, train, storage_of(storage), TeacherRef.from_dict(teacher),
                    DataRef.from_dict(data), {k: CacheRef.from_dict(c) for k, c in caches.items()}, progress=progress,
                    fail_at_step=int(os.environ[FAIL_AT_STEP_ENV]) if os.environ.get(FAIL_AT_STEP_ENV) else None)
    return asdict(result) | {"history": result.history[-1:]}
