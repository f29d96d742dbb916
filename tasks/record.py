"""Run-record tasks: save the run's config and each stage's output under runs/<run_id>/."""

from __future__ import annotations

from typing import Any

from prefect import task

from distill_core.config import RunConfig
from distill_core.run_record import RunRecord
from tasks.common import storage_of


@task(name="start-run")
def start_run(config: RunConfig, run_id: str) -> None:
    RunRecord(storage_of(config.storage), run_id).save_config(config)


@task(name="record-stage", task_run_name="record-{stage}")
def record_stage(config: RunConfig, run_id: str, stage: str, output: Any) -> None:
    RunRecord(storage_of(config.storage), run_id).write_stage(stage, output)


@task(name="read-stage", task_run_name="read-{stage}")
def read_stage(config: RunConfig, run_id: str, stage: str) -> Any:
    return RunRecord(storage_of(config.storage), run_id).read_stage(stage)


@task(name="read-caches")
def read_caches(config: RunConfig, run_id: str) -> dict[str, Any]:
    """{kind: CacheRef dict} for every teacher cache the run's loss terms train on."""
    return RunRecord(storage_of(config.storage), run_id).read_caches(config.train)
