"""The shard tasks' teacher loader."""

import torch

from distill_core.config import PathTeacher
from distill_core.storage import Storage
from distill_core.teacher.load import resolve_teacher
from tasks.teacher import _release_teacher, _shard_teacher


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
