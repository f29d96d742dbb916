"""Training task: one student (KD or CE-only baseline) from the teacher, data and caches."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from distill_core.cache.ref import CacheRef
from distill_core.config import LossTerm, StorageConfig, StudentConfig, TrainConfig
from distill_core.data import DataRef
from distill_core.report import loss_table
from distill_core.teacher.load import TeacherRef
from distill_core.train import train_student as _train
from tasks.common import CONTENT, artifact_key, progress_reporter, storage_of, transient

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
    resumes from its latest checkpoint (and says so in the log). Publishes the loss history as a table."""
    logger = get_run_logger()
    bar = progress_reporter(f"train-{name}-{teacher['fingerprint']}", f"{name} training steps")
    every = max(1, train.steps // 10)

    def progress(step: int, total: int, record: dict) -> None:
        bar(step, total)
        if step % every == 0 or step == total:
            logger.info("%s step %d/%d %s", name, step, total, {k: round(v, 4) for k, v in record.items() if k != "step"})

    with forwarded("distill_core.checkpoints", logger):
        result = _train(name, terms, student, train, storage_of(storage), TeacherRef.from_dict(teacher),
                        DataRef.from_dict(data), {k: CacheRef.from_dict(c) for k, c in caches.items()}, progress=progress,
                        fail_at_step=int(os.environ[FAIL_AT_STEP_ENV]) if os.environ.get(FAIL_AT_STEP_ENV) else None)
    create_table_artifact(
        table=loss_table(result.history), key=artifact_key("loss", name, teacher["fingerprint"]),
        description=f"{name}: loss and each loss term per step",
    )
    return asdict(result) | {"history": result.history[-1:]}


@contextmanager
def forwarded(library_logger: str, run_logger):
    """Send the library logger's INFO and above to the task's run logger, which the Prefect UI shows."""
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: run_logger.log(record.levelno, record.getMessage())
    lib = logging.getLogger(library_logger)
    level = lib.level
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(level)
