"""Flow run names that say what runs: stage, teacher, student, data, date."""

from __future__ import annotations

import datetime as dt
from typing import Callable

from prefect.runtime import flow_run

from distill_core.config import RunConfig


def describe(config: RunConfig) -> str:
    t = config.teacher
    teacher = {"hub": getattr(t, "name", ""), "path": getattr(t, "path", "").rstrip("/").split("/")[-1],
               "gguf": getattr(t, "file", "")}[t.kind].split("/")[-1].removesuffix(".gguf")
    data = config.data.source.rstrip("/").split("/")[-1]
    return f"{teacher or t.kind}-to-{config.registry.name}-on-{data}"


def run_name(stage: str) -> Callable[[], str]:
    def name() -> str:
        params = flow_run.parameters
        config = params.get("config")
        config = config if isinstance(config, RunConfig) else RunConfig.model_validate(config or {})
        return f"{stage}-{describe(config)}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"

    return name
