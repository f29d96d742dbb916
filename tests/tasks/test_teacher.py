"""The teacher tasks: the shard tasks' teacher loader, and which errors their retries take."""

import pytest
import torch

import tasks.teacher as teacher_tasks
import tasks.train as train_tasks
from distill_core.config import DataConfig, LossTerm, PathTeacher, StorageConfig, StudentConfig, TopKConfig, TrainConfig
from distill_core.data import prepare_data
from distill_core.errors import CacheError, ConfigError, TeacherError
from distill_core.storage import Storage
from distill_core.teacher.load import resolve_teacher
from tasks.common import storage_of
from tasks.teacher import _release_teacher, _shard_teacher, cache_shard, commit_cache, plan_cache
from tasks.train import train_student


def test_shard_teacher_runs_in_the_resolved_precision_and_loads_once(tiny_teacher_dir, tmp_path):
    storage = Storage(str(tmp_path / "runs"))
    half = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir), dtype="bfloat16"), storage)
    load = _shard_teacher(half, storage)
    try:
        model = load()
        assert model.dtype == torch.bfloat16 and not model.training
        assert load() is model
        full = _shard_teacher(resolve_teacher(PathTeacher(path=str(tiny_teacher_dir), dtype="float32"), storage), storage)()
        assert full.dtype == torch.float32
    finally:
        _release_teacher()


# -- retries: for I/O, never for a user error --------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def refs(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    """(storage config, teacher dict, data dict) of a tiny prepared run."""
    storage = StorageConfig(root=str(tmp_path / "root"))
    root = storage_of(storage)
    teacher = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), root)
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=8), tiny_tokenizer, teacher.tokenizer_hash, root)
    return storage, teacher.to_dict(), data.to_dict()


def _counting(monkeypatch, module, name: str, error: BaseException | None = None) -> list:
    """Replace ``module.name`` by a function that records each call, then raises ``error`` (or calls the original)."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        if error is not None:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_a_topk_wider_than_the_vocabulary_fails_planning_once(prefect_api, refs, monkeypatch):
    storage, teacher, data = refs
    checks = _counting(monkeypatch, teacher_tasks, "check_stage")
    plans = _counting(monkeypatch, teacher_tasks.stage, "plan")
    state = plan_cache("topk", teacher, data, TopKConfig(k=385), storage, return_state=True)
    assert state.is_failed() and len(checks) == 1 and not plans  # plan-cache has retries=2: none were used
    with pytest.raises(ConfigError, match="topk.k is 385 but the teacher's vocabulary has only 384 tokens"):
        state.result()


@pytest.mark.parametrize("error, attempts", [(TeacherError("teacher mismatch: fix it"), 1), (OSError("storage hiccup"), 4)])
def test_shard_tasks_retry_io_errors_but_not_user_errors(prefect_api, refs, monkeypatch, error, attempts):
    storage, teacher, data = refs
    calls = _counting(monkeypatch, teacher_tasks.stage, "run_shard", error)
    shard = cache_shard.with_options(retry_delay_seconds=0)
    state = shard("topk", teacher, data, TopKConfig(k=8), storage, "part-00000", return_state=True)
    assert state.is_failed() and len(calls) == attempts


@pytest.mark.parametrize("error, attempts", [(CacheError("damaged shard: recompute the cache"), 1), (OSError("storage hiccup"), 2)])
def test_training_retries_io_errors_but_not_user_errors(prefect_api, refs, monkeypatch, error, attempts):
    storage, teacher, data = refs
    calls = _counting(monkeypatch, train_tasks, "_train", error)
    state = train_student("student", [LossTerm(name="ce")], StudentConfig(), TrainConfig(steps=1), storage, teacher, data, {},
                          return_state=True)
    assert state.is_failed() and len(calls) == attempts


def test_a_user_error_of_a_shard_is_reported_as_it_is(refs):
    storage, teacher, data = refs
    written = [{"name": "part-00000"}, TeacherError("teacher mismatch: resolve the teacher again")]
    with pytest.raises(TeacherError, match="1 of 2 topk shard tasks failed, one with: teacher mismatch: resolve the teacher again"):
        commit_cache.fn("topk", teacher, data, TopKConfig(k=8), storage, written)
