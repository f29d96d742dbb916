"""Serve every deployment from one process, no worker needed: ``distillery serve`` / ``make serve``.

The same deployments as ``deployments/prefect.yaml`` (a test keeps the two in step): ``nightly``
on a cron schedule with a time zone, and one ``stage-<flow name>`` deployment per stage flow (e.g.
``train-student/stage-train-student``), to run a single stage on an existing run id from the UI. Parameters come from a run config file (default
``deployments/demo.yaml``), validated before anything is served.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.schedules import Cron

from distill_core.config import load_config

DEPLOYMENTS_DIR = Path(__file__).resolve().parents[1] / "deployments"
DEFAULT_CONFIG = DEPLOYMENTS_DIR / "demo.yaml"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 every night, in NIGHTLY_TIMEZONE (daylight saving handled)
NIGHTLY_TIMEZONE = "Europe/Berlin"
NIGHTLY_DEPLOYMENT = "nightly"
TAGS = ["distillery"]


def stage_deployment_name(flow_name: str) -> str:
    """``stage-<flow name>``: distinct names, so a list of deployments says which stage each one runs."""
    return f"stage-{flow_name}"


def run_parameters(config_file: str | Path = DEFAULT_CONFIG) -> dict:
    """The ``config`` parameter as written in ``config_file``; raises ConfigError when it is invalid."""
    load_config(config_file)  # refuse a bad file before serving it
    return yaml.safe_load(Path(config_file).read_text()) or {}


def build_deployments(config_file: str | Path = DEFAULT_CONFIG) -> list:
    """RunnerDeployments: the scheduled nightly flow, then one unscheduled deployment per stage."""
    from flows.nightly import nightly
    from flows.stages import STAGES

    config = run_parameters(config_file)
    deployments = [
        nightly.to_deployment(
            name=NIGHTLY_DEPLOYMENT,
            schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],
            parameters={"config": config},
            tags=TAGS,
            description="Every stage in order on a fresh run id: data, teacher caches, training, evaluation, registry.",
        )
    ]
    for stage, stage_flow in STAGES.items():
        deployments.append(stage_flow.to_deployment(
            name=stage_deployment_name(stage_flow.name),
            parameters={"config": config},
            tags=[*TAGS, "stage"],
            description=f"The {stage} stage alone on an existing run id (fill in run_id).",
        ))
    return deployments


def serve(config_file: str | Path = DEFAULT_CONFIG, limit: int | None = 1) -> None:
    """Serve the deployments until interrupted; ``limit`` caps concurrent flow runs (one by default)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(config_file), limit=limit)
