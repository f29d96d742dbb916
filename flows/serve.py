"""Serve every deployment from one process, no worker needed: ``distillery serve`` / ``make serve``.

The same deployments as ``deployments/prefect.yaml`` (a test keeps the two in step): ``nightly``
on a cron schedule with a time zone, and one ``stage-<flow name>`` deployment per stage flow (e.g.
``train-student/stage-train-student``), to run a single stage on an existing run id from the UI.
Parameters come from a run config file (default ``deployments/demo.yaml``), validated before
anything is served.
"""

from __future__ import annotations

import logging
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


def take_over(deployments: list) -> list[str]:
    """Detach the deployments of the same names that ``prefect deploy`` made for the work pool, so
    this process can run them; returns their names.

    Serving updates an existing deployment in place and leaves its work pool, its ``path`` (none for
    a pool deployment) and clears its pull steps, so every served run would crash looking for its
    code at ``None``. This points each at the folder serve runs from and takes it off the pool;
    ``prefect deploy --all`` hands the deployments back to the pool later."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name or existing.pull_steps or existing.path != deployment._path:
                client.update_deployment(existing.id, DeploymentUpdate(work_pool_name=None, path=deployment._path, pull_steps=None))
                taken.append(deployment.full_name)
    return taken


def serve(config_file: str | Path = DEFAULT_CONFIG, limit: int | None = 1) -> None:
    """Serve the deployments until interrupted; ``limit`` caps concurrent flow runs (one by default).

    Deployments that ``prefect deploy`` made for the work pool are taken over (:func:`take_over`).
    On exit Prefect pauses every served deployment, the nightly schedule included, until the next
    ``distillery serve`` (or ``prefect deploy --all``) resumes them."""
    from prefect import serve as prefect_serve

    deployments = build_deployments(config_file)
    if taken := take_over(deployments):
        logging.getLogger(__name__).warning(
            "serving %s from this process instead of work pool deployments; `prefect deploy --all` hands them back",
            ", ".join(taken),
        )
    prefect_serve(*deployments, limit=limit)
