"""Report task: the run's Markdown report as an artifact keyed by model name, so it versions across runs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.runtime import flow_run

from distill_core.config import RunConfig
from distill_core.report import gather, markdown_report
from tasks.common import artifact_key, storage_of


@task(name="publish-report")
def publish_report(config: RunConfig, run_id: str) -> str:
    """Create the ``report-<model name>`` Markdown artifact for ``run_id``; returns the Markdown."""
    summary = gather(storage_of(config.storage), run_id)
    markdown = markdown_report(summary, stage_timings(flow_run.id))
    create_markdown_artifact(
        markdown=markdown, key=artifact_key("report", config.registry.name),
        description=f"distillation run {run_id}: metrics, storage, timings, loss curves",
    )
    return markdown


def stage_timings(parent_flow_run_id) -> dict[str, dict[str, Any]]:
    """{stage flow name: seconds, state} of the latest run of each subflow of ``parent_flow_run_id``.

    A retried parent has several runs of a stage; the latest one is reported, with the count."""
    if parent_flow_run_id is None:
        return {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id]))
        )
        names = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in runs}}
    by_stage: dict[str, list] = defaultdict(list)
    for run in runs:
        by_stage[names[run.flow_id]].append(run)
    out = {}
    for stage, stage_runs in sorted(by_stage.items(), key=lambda kv: min(_start(r) for r in kv[1])):
        latest = max(stage_runs, key=_start)
        state = latest.state.name if latest.state else "?"
        out[stage] = {
            "seconds": round(latest.total_run_time.total_seconds(), 2),
            "state": state if len(stage_runs) == 1 else f"{state} (latest of {len(stage_runs)} runs)",
        }
    return out


def _start(run) -> float:
    t = run.start_time or run.expected_start_time
    return t.timestamp() if t else 0.0
