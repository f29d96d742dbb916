"""On-policy distillation in rounds: the student writes, the teacher grades, the student trains.

Round r (1..R) has two stages. :func:`sample_round`: the student as it is after round r−1 continues
train prompts and the teacher grades every written position (:mod:`distill_core.teacher.grade`), into a
cache addressed by that student's weights. :func:`train_round`: the student trains ``round_steps``
steps, a share ``on_policy_fraction`` of them on batches of those graded samples (the loss parts on
``student_samples``), the others on the other parts' sources (data, teacher samples, beams).

One training run spans the rounds: the same optimizer, learning-rate schedule (over ``train.steps``) and
checkpoints; a round ends with a checkpoint at its last step, and the next resumes from it. So a run
killed anywhere resumes at the round and step it reached, and its final weights equal an uninterrupted
run's. Under the student's folder:

    rounds/0/model/           the student round 1 starts from (built as configured, or the champion)
    rounds/<r>/model/         the student after round r < R, which samples in round r+1
    model/                    the student after round R (as for any student)

each ``rounds/<r>/model/`` with ``round.json`` written last: its weights fingerprint and what made it.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict
from typing import Callable, Iterator

import torch

from distill_core import checkpoints
from distill_core.batches import RowStream, StepBatch, collators, samples_stream
from distill_core.cache import stage
from distill_core.cache.ref import CacheRef
from distill_core.config import LossTerm, StudentSamplesConfig, TopKConfig, TrainConfig
from distill_core.errors import CacheError, ConfigError
from distill_core.storage import Storage, fingerprint
from distill_core.teacher.grade import student_samples_job, teacher_nll, weights_fingerprint
from distill_core.train import (
    Progress, finished, initial_student, source_streams, source_temperatures, student_folder, train, used_caches,
)

ROUND = "round.json"
SOURCE = "student_samples"


def on_policy_step(step: int, cfg: TrainConfig) -> bool:
    """Whether 0-based optimizer step ``step`` trains on the graded student samples: the steps of each
    round are spread evenly, the ``on_policy_fraction`` share of them on-policy (all of them at 1)."""
    i, f = step % cfg.steps_per_round, cfg.on_policy_fraction
    return math.floor((i + 1) * f + 1e-9) > math.floor(i * f + 1e-9)


def round_batches(graded: RowStream, others: dict[str, RowStream], cfg: TrainConfig, round_: int, pad_id: int
                  ) -> Callable[[int], Iterator[StepBatch]]:
    """``skip -> iterator of StepBatch`` for round ``round_``, as :func:`distill_core.train.train` takes it:
    on-policy steps yield a batch of ``graded`` rows (this round's cache, read from its start), the others
    one batch of each source in ``others`` (read on from where the earlier rounds left them). ``skip`` is
    the micro-batches before the resumed step (a whole number of steps)."""
    first, ga = (round_ - 1) * cfg.steps_per_round, cfg.grad_accum

    def batches(skip: int) -> Iterator[StepBatch]:
        start = skip // ga
        on_before = sum(on_policy_step(s, cfg) for s in range(first, start)) * ga
        off_before = sum(not on_policy_step(s, cfg) for s in range(start)) * ga
        on_it = graded.batches(cfg.batch_size, on_before)
        off_its = {src: stream.batches(cfg.batch_size, off_before) for src, stream in others.items()}
        step, collate = start, collators(pad_id)
        while True:
            on = on_policy_step(step, cfg)
            for _ in range(ga):
                if on:
                    yield StepBatch({SOURCE: collate[SOURCE](next(on_it))})
                else:
                    yield StepBatch({src: collate[src](next(it)) for src, it in off_its.items()})
            step += 1

    return batches


# -- the student's folder and where it starts ------------------------------------------------------
def champion_start(storage: Storage, registry_name: str, teacher_ref) -> dict:
    """The registered champion of ``registry_name`` as the start of round 1: {folder, version, fingerprint}.

    Refused (before any sampling) when there is none, or when it was distilled from another teacher or
    saved with another tokenizer than this run's."""
    from transformers import AutoTokenizer

    from distill_core import registry
    from distill_core.errors import RegistryError
    from distill_core.teacher.load import tokenizer_hash

    try:
        entry = registry.get_version(storage, registry_name, registry.CHAMPION)
    except RegistryError as e:
        raise ConfigError(f"student_samples.policy is 'champion' but registry {registry_name!r} has no champion ({e}): "
                          "run once with policy init, or set registry.name to a model that has one.") from None
    where = f"champion of {registry_name!r} (version {entry['version']})"
    teacher_fp = entry["lineage"].get("teacher_fingerprint")
    if teacher_fp != teacher_ref.fingerprint:
        raise ConfigError(f"the {where} was distilled from teacher {teacher_fp}, not this run's {teacher_ref.fingerprint} "
                          f"({teacher_ref.source}): set student_samples.policy to init, or registry.name to a model of this teacher.")
    tok_hash = tokenizer_hash(AutoTokenizer.from_pretrained(storage.local_dir(entry["path"])))
    if tok_hash != teacher_ref.tokenizer_hash:
        raise ConfigError(f"the {where} has another tokenizer (hash {tok_hash}) than this run's teacher "
                          f"({teacher_ref.tokenizer_hash}): set student_samples.policy to init, or registry.name to a "
                          "model of this teacher.")
    return {"folder": entry["path"], "version": entry["version"], "fingerprint": fingerprint(entry["files"])}


def rounds_folder(name: str, terms: list[LossTerm], student_cfg, train_cfg: TrainConfig, samples_cfg: StudentSamplesConfig,
                  topk_cfg: TopKConfig, teacher_ref, data, caches: dict, champion: dict | None) -> tuple[str, dict]:
    """(the student's folder, {kind: CacheRef} of the other parts' teacher caches). The folder's address
    holds every input of a run in rounds: what :func:`distill_core.train.student_folder` takes, the
    sampling and grading settings, and the champion it starts from (when it does)."""
    used, inputs = used_caches(name, terms, caches, teacher_ref, data)
    inputs = {**inputs, SOURCE: samples_cfg.model_dump(exclude={"batch_size", "policy"}),
              "grading": {"k": topk_cfg.k, "temperature": topk_cfg.temperature},
              "start": champion["fingerprint"] if champion else "init"}
    return student_folder(name, student_cfg, train_cfg, terms, inputs), used


def round_model(out: str, round_: int) -> str:
    """The folder of the student after round ``round_`` (0: the start) below ``rounds/``."""
    return f"{out}/rounds/{round_}/model"


def start_rounds(out: str, student_cfg, train_cfg: TrainConfig, storage: Storage, teacher_ref, data,
                 champion: dict | None) -> dict:
    """Save the student round 1 starts from (once); returns its ``round.json``."""
    folder = round_model(out, 0)
    if storage.exists(f"{folder}/{ROUND}"):
        return storage.read_json(f"{folder}/{ROUND}")
    from distill_core.evaluate import load_model
    from distill_core.teacher.load import load_tokenizer

    if champion is not None:
        student, tokenizer, init = load_model(storage, champion["folder"]), load_tokenizer(teacher_ref, storage), None
    else:
        student, tokenizer, init = initial_student(student_cfg, train_cfg, storage, teacher_ref, data)
    return _save_round(student, tokenizer, storage, folder, {"round": 0, "init": init, "champion": champion})


def _save_round(student, tokenizer, storage: Storage, folder: str, record: dict) -> dict:
    record = {**record, "student_fingerprint": weights_fingerprint(student)}
    with tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, folder)
    storage.write_json(f"{folder}/{ROUND}", record)  # last: the folder counts once this is there
    return record


def _finished_round(storage: Storage, out: str, round_: int) -> dict:
    folder = round_model(out, round_)
    if not storage.exists(f"{folder}/{ROUND}"):
        stage_name = "the first round's sample_round" if round_ == 0 else f"train_round {round_}"
        raise CacheError(f"{storage.url(folder)} is missing: the student after round {round_} is not saved yet; "
                         f"run {stage_name} first.")
    return storage.read_json(f"{folder}/{ROUND}")


# -- the two stages of a round ---------------------------------------------------------------------
def sample_round(round_: int, out: str, samples_cfg: StudentSamplesConfig, topk_cfg: TopKConfig, teacher: dict, data,
                 storage: Storage, load_teacher: Callable[[], torch.nn.Module], progress=None) -> CacheRef:
    """Round ``round_``'s graded samples: the student after round ``round_``−1 writes, the teacher grades.

    Nothing is computed (nor loaded) when the cache of that student is there already."""
    from distill_core.evaluate import load_model

    folder = round_model(out, round_ - 1)
    student_fp = _finished_round(storage, out, round_ - 1)["student_fingerprint"]
    job = student_samples_job(samples_cfg, topk_cfg, teacher, data, student_fp,
                              lambda device: load_model(storage, folder).to(device))
    return stage.run_all(job, load_teacher, data, storage, progress)


def train_round(
    round_: int, name: str, terms: list[LossTerm], out: str, train_cfg: TrainConfig, storage: Storage, teacher_ref, data,
    used: dict, graded: CacheRef, *, progress: Progress | None = None, fail_at_step: int | None = None,
) -> dict:
    """Train round ``round_`` on its graded samples ``graded`` and the other sources (``used`` caches);
    returns the round's record: the train result, the student's fingerprint, the cache and the round's
    metrics (mean loss parts over its steps; the teacher's NLL of the samples it trained on)."""
    from distill_core.evaluate import load_model
    from distill_core.teacher.load import load_tokenizer

    last = round_ == train_cfg.rounds
    rs = train_cfg.steps_per_round
    folder = f"{out}/model" if last else round_model(out, round_)
    if (last and (result := finished(storage, out, train_cfg)) is not None) or (
            not last and storage.exists(f"{folder}/{ROUND}")):
        return _record(round_, storage, out, train_cfg, graded, result if last else None)
    start = _finished_round(storage, out, 0)
    if round_ > 1:
        _finished_round(storage, out, round_ - 1)
        reached = checkpoints.latest_checkpoint(storage, out) or 0
        if reached < (round_ - 1) * rs:
            raise CacheError(f"{storage.url(out)} has no checkpoint at the end of round {round_ - 1} (step "
                             f"{(round_ - 1) * rs}; latest: {reached}): rerun train_round {round_ - 1}.")
    student = load_model(storage, round_model(out, 0))  # weights: the start, or the checkpoint train() resumes
    tokenizer = load_tokenizer(teacher_ref, storage)
    others = [t for t in terms if t.source != SOURCE]
    batches = round_batches(samples_stream(storage, data, graded, seed=train_cfg.seed),
                            source_streams(others, storage, data, used, train_cfg), train_cfg, round_,
                            pad_id=tokenizer.pad_token_id)
    temperatures = {**source_temperatures(used, train_cfg), SOURCE: graded.meta["soft_temperature"]}
    result = train(student, batches, train_cfg, terms, storage, out, temperatures=temperatures,
                   length_penalty=used["beams"].meta["length_penalty"] if "beams" in used else 1.0, tokenizer=tokenizer,
                   progress=progress, fail_at_step=fail_at_step, init=start.get("init"),
                   until=None if last else round_ * rs)
    if not last:
        _save_round(student, tokenizer, storage, folder, {"round": round_, "result": asdict(result), "cache": graded.folder})
    return _record(round_, storage, out, train_cfg, graded, result if last else None)


def _record(round_: int, storage: Storage, out: str, train_cfg: TrainConfig, graded: CacheRef, final) -> dict:
    last = round_ == train_cfg.rounds
    if last:
        result = asdict(final)
        from distill_core.evaluate import load_model

        fp = weights_fingerprint(load_model(storage, f"{out}/model"))
    else:
        saved = storage.read_json(f"{round_model(out, round_)}/{ROUND}")
        result, fp = saved["result"], saved["student_fingerprint"]
    rs = train_cfg.steps_per_round
    steps = [h for h in result["history"] if (round_ - 1) * rs < h["step"] <= round_ * rs]
    names = sorted({k for h in steps for k in h if k not in ("step", "lr")})
    metrics = {k: sum(h[k] for h in steps if k in h) / max(1, sum(k in h for h in steps)) for k in names}
    metrics.update({f"samples_{k}": v for k, v in teacher_nll(storage, graded).items()})
    return {"round": round_, "student_folder": f"{out}/model" if last else round_model(out, round_),
            "student_fingerprint": fp, "cache": graded.to_dict(), "metrics": metrics,
            "result": result | {"history": result["history"][-1:]}}

