"""The nightly flow: every stage in order, on one run id."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from distill_core.config import RunConfig
from distill_core.run_record import new_run_id
from flows.lock import holds_run_lock
from flows.naming import run_name
from flows.overrides import merges_deployment_config
from flows.runners import configured
from flows.stages import STAGES, evaluate_flow, prepare_data_flow, register_flow, sample_round_flow, train_flow, train_round_flow
from tasks.report import publish_report


@flow(name="nightly-distillation", flow_run_name=run_name("nightly"))
@merges_deployment_config
@holds_run_lock(resolve_run_id=lambda config, run_id: run_id or _default_run_id(config))
def nightly(config: RunConfig = RunConfig(), run_id: str | None = None) -> dict:
    """Prepare data, cache the teacher outputs the loss terms need (top-k soft targets, samples, beam
    candidates), run the on-policy rounds when configured (each round: the student samples and the teacher
    grades, then the student trains), train, evaluate and register the student.

    Without a run id, one is derived from the flow run, so retrying this flow run reuses it."""
    run_id = run_id or _default_run_id(config)
    configured(prepare_data_flow, config)(run_id=run_id, config=config)
    for kind in config.train.caches():
        configured(STAGES[f"cache_{kind}"], config)(run_id=run_id, config=config)
    for round_ in range(1, config.train.rounds + 1) if config.train.on_policy else ():
        configured(sample_round_flow, config)(run_id=run_id, config=config, round=round_)
        configured(train_round_flow, config)(run_id=run_id, config=config, round=round_)
    configured(train_flow, config)(run_id=run_id, config=config)
    metrics = configured(evaluate_flow, config)(run_id=run_id, config=config)
    registered = configured(register_flow, config)(run_id=run_id, config=config)
    result = {"run_id": run_id, "registered": registered, "metrics": metrics}
    publish_report(config, run_id)
    return result


def _default_run_id(config: RunConfig) -> str:
    if flow_run.id:
        return f"{config.registry.name}-{flow_run.scheduled_start_time:%Y%m%d}-{str(flow_run.id)[:8]}"
    return new_run_id(config)
