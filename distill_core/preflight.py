"""Checks that need the teacher's identity but no heavy work; run before any teacher or training stage."""

from __future__ import annotations

import json

import fsspec

from distill_core.config import RunConfig
from distill_core.errors import ConfigError, TeacherError


def teacher_config(teacher_path: str, storage_options: dict | None = None) -> dict:
    with fsspec.open(f"{teacher_path.rstrip('/')}/config.json", "r", **(storage_options or {})) as f:
        return json.load(f)


def check_run(cfg: RunConfig, teacher) -> None:
    """Raise ConfigError/TeacherError for settings that cannot work with this teacher.

    ``teacher`` is a resolved TeacherRef (vocab_size, num_layers, path)."""
    tcfg = teacher_config(teacher.path, cfg.storage.options)
    max_positions = tcfg.get("n_positions") or tcfg.get("max_position_embeddings")
    if max_positions and cfg.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} exceeds the teacher's context of {max_positions} tokens: lower data.seq_len."
        )
    student = cfg.student
    if student.init == "teacher_layers" and student.layers is not None:
        bad = [i for i in student.layers if i >= teacher.num_layers]
        if bad:
            raise ConfigError(
                f"student.layers {bad} are out of range: the teacher has {teacher.num_layers} layers (0..{teacher.num_layers - 1})."
            )
    if student.init == "pretrained":
        from transformers import AutoConfig

        try:
            vocab = AutoConfig.from_pretrained(student.pretrained).vocab_size
        except OSError as e:
            raise TeacherError(f"cannot read the pretrained student {student.pretrained!r}: {e}. Check the path or hub id.") from None
        if vocab != teacher.vocab_size:
            raise TeacherError(
                f"student vocabulary ({vocab} tokens, {student.pretrained}) differs from the teacher's "
                f"({teacher.vocab_size}): distillation needs a shared tokenizer; pick a student of the teacher's family."
            )
    if student.init == "pruned":
        from transformers import AutoConfig

        from distill_core.pruning.plan import check_request

        fields = dict(tcfg)
        check_request(AutoConfig.for_model(fields.pop("model_type"), **fields), student)
