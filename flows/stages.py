"""One flow per stage, each runnable alone on an existing run id; inputs come from the run record."""

from __future__ import annotations

from prefect import flow

from distill_core.config import LossTerm, RunConfig
from flows.naming import run_name
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.record import read_stage, record_stage, start_run
from tasks.registry import register_student
from tasks.teacher import cache_topk, preflight, resolve_teacher
from tasks.train import train_student


@flow(name="prepare-data", flow_run_name=run_name("prepare-data"))
def prepare_data_flow(config: RunConfig, run_id: str) -> dict:
    """Resolve the teacher, check the run against it, and tokenize + pack the data."""
    start_run(config, run_id)
    teacher = resolve_teacher(config.teacher, config.storage)
    preflight(config, teacher)
    data = prepare_data(config.data, teacher, config.storage)
    record_stage(config, run_id, "teacher", teacher)
    record_stage(config, run_id, "prepare_data", data)
    return data


@flow(name="cache-topk", flow_run_name=run_name("cache-topk"))
def cache_topk_flow(config: RunConfig, run_id: str) -> dict:
    """The teacher's top-k soft targets over the train shards."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    cache = cache_topk(teacher, data, config.topk, config.storage)
    record_stage(config, run_id, "cache_topk", cache)
    return cache


@flow(name="train-student", flow_run_name=run_name("train-student"))
def train_flow(config: RunConfig, run_id: str) -> dict:
    """The distilled student and, when configured, a CE-only baseline with the same budget."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    cache = read_stage(config, run_id, "cache_topk") if config.train.kd_terms else None
    common = dict(student=config.student, train=config.train, storage=config.storage, teacher=teacher, data=data)
    results = {"student": train_student("student", config.train.losses, cache=cache, **common)}
    if config.train.baseline:
        results["baseline"] = train_student("baseline", [LossTerm(name="ce")], cache=None, **common)
    record_stage(config, run_id, "train_student", results)
    return results


@flow(name="evaluate", flow_run_name=run_name("evaluate"))
def evaluate_flow(config: RunConfig, run_id: str) -> dict:
    """Held-out metrics of teacher, student and baseline."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    trained = read_stage(config, run_id, "train_student")
    folders = {name: result["model_folder"] for name, result in trained.items()}
    metrics = evaluate(teacher, folders, data, config.eval, config.storage, config.registry.name)
    record_stage(config, run_id, "evaluate", metrics)
    return metrics


@flow(name="register", flow_run_name=run_name("register"))
def register_flow(config: RunConfig, run_id: str) -> dict:
    """The student as a new registry version; the champion alias moves only if it wins."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    cache = read_stage(config, run_id, "cache_topk") if config.train.kd_terms else None
    trained = read_stage(config, run_id, "train_student")
    metrics = read_stage(config, run_id, "evaluate")
    registered = register_student(config, run_id, teacher, data, cache, trained["student"], metrics)
    record_stage(config, run_id, "register", registered)
    return registered


STAGES = {
    "prepare_data": prepare_data_flow,
    "cache_topk": cache_topk_flow,
    "train_student": train_flow,
    "evaluate": evaluate_flow,
    "register": register_flow,
}
