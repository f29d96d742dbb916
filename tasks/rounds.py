"""On-policy round tasks: the student's samples graded by the teacher, and the round's training."""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from distill_core import rounds
from distill_core.cache.ref import CacheRef
from distill_core.cache.repair import repair_damaged
from distill_core.config import RunConfig
from distill_core.data import DataRef
from distill_core.teacher.grade import student_samples_ref
from distill_core.teacher.load import TeacherRef, load_tokenizer
from tasks.common import progress_reporter, storage_of, transient
from tasks.teacher import GPU_TAG, _release_teacher, _shard_teacher
from tasks.train import FAIL_AT_STEP_ENV, forwarded

STUDENT = "student"  # the on-policy student; the CE-only baseline trains in train_student as ever


def _folder(config: RunConfig, teacher: TeacherRef, data: DataRef, caches: dict, champion: dict | None) -> tuple[str, dict]:
    terms = config.train.students()[STUDENT]
    return rounds.rounds_folder(STUDENT, terms, config.student, config.train, config.student_samples, config.topk, teacher,
                                data, {k: CacheRef.from_dict(c) for k, c in caches.items()}, champion)


# Results live in files (content-addressed by the student's weights); the task re-derives them cheaply,
# so Prefect's result cache is not used (a deleted cache is then recomputed, never returned stale).
@task(name="sample-round", task_run_name="sample-round-{round_}", tags=[GPU_TAG], cache_policy=NO_CACHE,
      retries=1, retry_condition_fn=transient)
def sample_round(round_: int, config: RunConfig, teacher: dict, data: dict, caches: dict, start: dict | None,
                 recompute_damaged: bool = False) -> dict:
    """Round ``round_``'s graded samples: the student after the previous round writes, the teacher grades.

    ``start``: round 1's record ({"out", "champion"}), None in round 1 itself, which picks the start (the
    champion is refused here, before any sampling, when its teacher or tokenizer is not the run's)."""
    root, ref, data_ref = storage_of(config.storage), TeacherRef.from_dict(teacher), DataRef.from_dict(data)
    if start is None:
        champion = (rounds.champion_start(root, config.registry.name, ref)
                    if config.student_samples.policy == "champion" else None)
        out, _ = _folder(config, ref, data_ref, caches, champion)
        rounds.start_rounds(out, config.student, config.train, root, ref, data_ref, champion)
    else:
        out, champion = start["out"], start["champion"]
    logger = get_run_logger()
    if recompute_damaged:
        fp = root.read_json(f"{rounds.round_model(out, round_ - 1)}/{rounds.ROUND}")["student_fingerprint"]
        cache = student_samples_ref(config.student_samples, config.topk, teacher, data_ref, fp)
        dropped = repair_damaged(root, data_ref, config.data, lambda: load_tokenizer(ref, root), [cache])
        for folder, names in dropped.items():
            logger.warning("%s: %d damaged shard(s) dropped for recomputation: %s", folder, len(names), ", ".join(names))
    bar = progress_reporter(f"sample-round-{round_}-{teacher['fingerprint']}", f"round {round_}: student samples graded (shards)")
    try:
        graded = rounds.sample_round(round_, out, config.student_samples, config.topk, teacher, data_ref, root,
                                     _shard_teacher(ref, root), progress=bar)
    finally:
        _release_teacher()  # free the teacher for the round's training
    logger.info("round %d: graded samples in %s", round_, graded.folder)
    return {"round": round_, "out": out, "champion": champion, "cache": graded.to_dict()}


@task(name="train-round", task_run_name="train-round-{round_}", cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=transient)
def train_round(round_: int, config: RunConfig, teacher: dict, data: dict, caches: dict, sampled: dict) -> dict:
    """Train round ``round_`` on its graded samples (``sampled``: the round's sample_round record) and
    the other loss parts' sources; a rerun resumes from the latest checkpoint. Returns the round record."""
    logger = get_run_logger()
    root, ref, data_ref = storage_of(config.storage), TeacherRef.from_dict(teacher), DataRef.from_dict(data)
    terms = config.train.students()[STUDENT]
    _, used = _folder(config, ref, data_ref, caches, sampled["champion"])
    bar = progress_reporter(f"train-round-{round_}-{teacher['fingerprint']}", f"round {round_} training steps")

    def progress(step: int, total: int, record: dict) -> None:
        bar(step, total)

    with forwarded("distill_core.checkpoints", logger):
        record = rounds.train_round(
            round_, STUDENT, terms, sampled["out"], config.train, root, ref, data_ref, used, CacheRef.from_dict(sampled["cache"]),
            progress=progress, fail_at_step=int(os.environ[FAIL_AT_STEP_ENV]) if os.environ.get(FAIL_AT_STEP_ENV) else None,
        )
    logger.info("round %d: %s", round_, {k: round(v, 4) for k, v in record["metrics"].items()})
    return record
