"""One flow per stage, each runnable alone on an existing run id; inputs come from the run record.

``run_id`` comes first in every stage flow, so that the deployments' forms ask for it first; call them
with keywords (``stage(run_id=..., config=...)``)."""

from __future__ import annotations

from prefect import allow_failure, flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from distill_core.config import RunConfig, caches_for
from distill_core.errors import ConfigError
from flows.lock import holds_run_lock
from flows.naming import run_name
from flows.overrides import merges_deployment_config
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.record import read_caches, read_stage, record_stage, start_run
from tasks.registry import register_student
from tasks.repair import repair_damaged
from tasks.rounds import sample_round, train_round
from tasks.teacher import cache_shard, commit_cache, plan_cache, preflight, resolve_teacher, topk_fidelity
from tasks.train import train_student


@flow(name="prepare-data", flow_run_name=run_name("prepare-data"))
@merges_deployment_config
@holds_run_lock
def prepare_data_flow(run_id: str, config: RunConfig) -> dict:
    """Resolve the teacher, check the run against it, and tokenize + pack the data.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
    """
    start_run(config, run_id)
    teacher = resolve_teacher(config.teacher, config.storage)
    preflight(config, teacher)
    data = prepare_data(config.data, teacher, config.storage)
    record_stage(config, run_id, "teacher", teacher)
    record_stage(config, run_id, "prepare_data", data)
    return data


def _cache_stage(kind: str, config: RunConfig, run_id: str, recompute_damaged: bool) -> dict:
    """One task per train shard still missing from the ``kind`` cache, then one commit of them all.

    recompute_damaged: first drop data and cache shards that fail their checksum, so they are recomputed."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    if recompute_damaged:
        repair_damaged(config, teacher, data, kind)
    cfg = getattr(config, kind)
    todo = plan_cache(kind, teacher, data, cfg, config.storage)
    written = cache_shard.map(
        kind=unmapped(kind), teacher=unmapped(teacher), data=unmapped(data), cfg=unmapped(cfg),
        storage=unmapped(config.storage), shard=todo,
    )
    cache = commit_cache(kind, teacher, data, cfg, config.storage, written=[allow_failure(w) for w in written])
    record_stage(config, run_id, f"cache_{kind}", cache)
    return cache


# Teacher stages run one shard at a time unless the caller picks a runner (flows.runners.configured:
# threads, Dask, Ray).
@flow(name="cache-topk", flow_run_name=run_name("cache-topk"), task_runner=ThreadPoolTaskRunner(max_workers=1))
@merges_deployment_config
@holds_run_lock
def cache_topk_flow(run_id: str, config: RunConfig, recompute_damaged: bool = False) -> dict:
    """Soft targets: the teacher's top-k log-probabilities (and tail mass) at every train position.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
        recompute_damaged: First check every data shard and every shard of this cache against its
            checksum, drop the damaged ones and compute them again (what `distillery repair-cache` does).
    """
    return _cache_stage("topk", config, run_id, recompute_damaged)


@flow(name="fidelity-topk", flow_run_name=run_name("fidelity-topk"))
@holds_run_lock
def topk_fidelity_flow(run_id: str, config: RunConfig, sequences: int = 16) -> dict:
    """Before a long capture: each top-k strategy's fidelity to the teacher and projected size, on a sample."""
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    report = topk_fidelity(teacher, data, config.topk, config.storage, sequences)
    record_stage(config, run_id, "fidelity_topk", report)
    return report


@flow(name="cache-samples", flow_run_name=run_name("cache-samples"), task_runner=ThreadPoolTaskRunner(max_workers=1))
@merges_deployment_config
@holds_run_lock
def cache_samples_flow(run_id: str, config: RunConfig, recompute_damaged: bool = False) -> dict:
    """Sequence-level KD: the teacher's sampled continuations of train prompts (+ optional soft targets).

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
        recompute_damaged: First check every data shard and every shard of this cache against its
            checksum, drop the damaged ones and compute them again (what `distillery repair-cache` does).
    """
    return _cache_stage("samples", config, run_id, recompute_damaged)


@flow(name="cache-beams", flow_run_name=run_name("cache-beams"), task_runner=ThreadPoolTaskRunner(max_workers=1))
@merges_deployment_config
@holds_run_lock
def cache_beams_flow(run_id: str, config: RunConfig, recompute_damaged: bool = False) -> dict:
    """Distilled beam search: all of the teacher's beam candidates per train prompt, with scores.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
        recompute_damaged: First check every data shard and every shard of this cache against its
            checksum, drop the damaged ones and compute them again (what `distillery repair-cache` does).
    """
    return _cache_stage("beams", config, run_id, recompute_damaged)


@flow(name="sample-round", flow_run_name=run_name("sample-round"))
@merges_deployment_config
@holds_run_lock
def sample_round_flow(run_id: str, config: RunConfig, round: int = 1, recompute_damaged: bool = False) -> dict:  # noqa: A002
    """On-policy round: the student as it is after the previous round continues train prompts, and the
    teacher grades every written position (its top-k soft targets). Round 1 samples with the starting
    student (built as configured, or the registered champion with student_samples.policy champion).

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
        round: The round, 1 to train.rounds; round r needs train_round r-1 finished.
        recompute_damaged: First check the data shards and this round's cache shards against their
            checksums, drop the damaged ones and compute them again.
    """
    _check_round(config, round)
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    caches = read_caches(config, run_id)
    start = None if round == 1 else read_stage(config, run_id, "sample_round_1")
    sampled = sample_round(round, config, teacher, data, caches, start, recompute_damaged)
    record_stage(config, run_id, f"sample_round_{round}", sampled)
    return sampled


@flow(name="train-round", flow_run_name=run_name("train-round"))
@merges_deployment_config
@holds_run_lock
def train_round_flow(run_id: str, config: RunConfig, round: int = 1) -> dict:  # noqa: A002
    """On-policy round: the student trains train.round_steps steps on its graded samples (a share
    train.on_policy_fraction of the steps) and the other loss parts' sources; a rerun resumes at the
    step it reached.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
        round: The round, 1 to train.rounds; it trains on sample_round's cache of the same round.
    """
    _check_round(config, round)
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    caches = read_caches(config, run_id)
    sampled = read_stage(config, run_id, f"sample_round_{round}")
    trained = train_round(round, config, teacher, data, caches, sampled)
    record_stage(config, run_id, f"train_round_{round}", trained)
    return trained


def _check_round(config: RunConfig, round_: int) -> None:
    if not config.train.on_policy:
        raise ConfigError("this run trains in no on-policy rounds (no loss part has on: student_samples): "
                          "run train_student instead.")
    if not 1 <= round_ <= config.train.rounds:
        raise ConfigError(f"round {round_} is not one of this run's rounds 1..{config.train.rounds}: pick one of them.")


@flow(name="train-student", flow_run_name=run_name("train-student"))
@merges_deployment_config
@holds_run_lock
def train_flow(run_id: str, config: RunConfig) -> dict:
    """The distilled student and, when configured, a CE-only baseline with the same budget. A student in
    on-policy rounds is trained by the rounds' stages: its result is the last train_round's.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
    """
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    caches = read_caches(config, run_id)
    common = dict(student=config.student, train=config.train, storage=config.storage, teacher=teacher, data=data)
    results = {
        name: train_student(name, terms, caches={k: caches[k] for k in caches_for(terms)}, **common)
        for name, terms in config.train.students().items()
        if not (name == "student" and config.train.on_policy)
    }
    if config.train.on_policy:
        results = {"student": read_stage(config, run_id, f"train_round_{config.train.rounds}")["result"], **results}
    record_stage(config, run_id, "train_student", results)
    return results


@flow(name="evaluate", flow_run_name=run_name("evaluate"))
@merges_deployment_config
@holds_run_lock
def evaluate_flow(run_id: str, config: RunConfig) -> dict:
    """Held-out metrics of teacher, student and baseline (+ sample and beam-selection metrics when
    a student trains on those caches, or when asked for).

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
    """
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    trained = read_stage(config, run_id, "train_student")
    folders = {name: result["model_folder"] for name, result in trained.items()}
    own = config.student.tokenizer is not None  # auto leaves out the metrics that compare token ids
    metrics = evaluate(
        teacher, folders, data, config.eval, config.storage, config.registry.name,
        generation=config.eval.wants("generation", config.train, own), selection=config.eval.wants("selection", config.train, own),
        beams=config.beams,
    )
    record_stage(config, run_id, "evaluate", metrics)
    return metrics


@flow(name="register", flow_run_name=run_name("register"))
@merges_deployment_config
@holds_run_lock
def register_flow(run_id: str, config: RunConfig) -> dict:
    """The student as a new registry version; the champion alias moves only if it wins.

    Args:
        run_id: The run to work on: the folder name under runs/ in the storage root that the earlier stages
            recorded, e.g. smollm2-student-20261201-1a2b3c4d. `distillery run` prints it first; a nightly
            run shows it in its report artifact ("distillation run <run_id>") and its result.
        config: The run config (the same for every stage of a run).
    """
    teacher = read_stage(config, run_id, "teacher")
    data = read_stage(config, run_id, "prepare_data")
    caches = read_caches(config, run_id)
    trained = read_stage(config, run_id, "train_student")
    metrics = read_stage(config, run_id, "evaluate")
    rounds = [read_stage(config, run_id, f"train_round_{r}") for r in range(1, config.train.rounds + 1)] if config.train.on_policy else None
    registered = register_student(config, run_id, teacher, data, caches, trained["student"], metrics, rounds)
    record_stage(config, run_id, "register", registered)
    return registered


STAGES = {
    "prepare_data": prepare_data_flow,
    "cache_topk": cache_topk_flow,
    "cache_samples": cache_samples_flow,
    "cache_beams": cache_beams_flow,
    "sample_round": sample_round_flow,
    "train_round": train_round_flow,
    "train_student": train_flow,
    "evaluate": evaluate_flow,
    "register": register_flow,
}
