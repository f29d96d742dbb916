"""Checks that need the teacher's identity but no heavy work; run before any teacher or training stage."""

from __future__ import annotations

import json

from distill_core.config import RunConfig
from distill_core.errors import ConfigError, TeacherError
from distill_core.storage import Storage, fs_for, loadable


def teacher_config(teacher_path: str, storage: Storage) -> dict:
    """The teacher's ``config.json`` from a local folder or an fsspec URL (read with ``storage``'s
    options, e.g. an S3 endpoint and credentials, when the URL has the storage root's protocol)."""
    fs, root = fs_for(teacher_path, storage)
    path = f"{root.rstrip('/')}/config.json"
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TeacherError(f"teacher folder {teacher_path} has no config.json: resolve the teacher again.") from None


# The setting of each cache stage that takes a top-k over the teacher's logits.
TOPK_FIELDS = {"topk": "k", "samples": "soft_topk"}


def check_stage(kind: str, cfg, vocab_size: int) -> None:
    """Raise ConfigError when cache stage ``kind``'s settings ``cfg`` cannot work with a teacher of
    ``vocab_size`` logits: a top-k over more ids than there are cannot be taken. Run by
    :func:`check_run` and again when a stage is planned, as a stage may run alone after its config changed."""
    field = TOPK_FIELDS.get(kind)
    k = getattr(cfg, field) if field else 0
    if kind == "topk" and cfg.strategy == "sampled":
        return  # no top-k is taken: only draws
    if kind == "topk" and cfg.strategy == "hybrid" and k >= vocab_size:
        raise ConfigError(
            f"topk.strategy 'hybrid' draws from the teacher's mass outside its top-k, but topk.k {k} covers the whole "
            f"{vocab_size}-token vocabulary: set topk.k below {vocab_size}, or topk.strategy to 'topk'."
        )
    if k > vocab_size:
        raise ConfigError(
            f"{kind}.{field} is {k} but the teacher's vocabulary has only {vocab_size} tokens: set {kind}.{field} to at "
            f"most {vocab_size} (a few dozen keep nearly all of the probability mass)."
        )


def check_run(cfg: RunConfig, teacher) -> None:
    """Raise ConfigError/TeacherError for settings that cannot work with this teacher.

    ``teacher`` is a resolved TeacherRef (vocab_size, num_layers, path, tokenizer_hash)."""
    storage = Storage(cfg.storage.root, cfg.storage.options)
    tcfg = teacher_config(teacher.path, storage)
    max_positions = tcfg.get("n_positions") or tcfg.get("max_position_embeddings")
    if max_positions and cfg.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} exceeds the teacher's context of {max_positions} tokens: lower data.seq_len."
        )
    for kind in TOPK_FIELDS:
        check_stage(kind, getattr(cfg, kind), teacher.vocab_size)
    student = cfg.student
    if student.init == "teacher_layers" and student.layers is not None:
        bad = [i for i in student.layers if i >= teacher.num_layers]
        if bad:
            raise ConfigError(
                f"student.layers {bad} are out of range: the teacher has {teacher.num_layers} layers (0..{teacher.num_layers - 1})."
            )
    if student.tokenizer is not None:
        check_cross_tokenizer(cfg, teacher, storage)
    elif student.init == "pretrained":
        check_pretrained_student(student.pretrained, teacher, storage)
    if student.init == "pruned":
        from transformers import AutoConfig

        from distill_core.pruning.plan import check_request

        fields = dict(tcfg)
        check_request(AutoConfig.for_model(fields.pop("model_type"), **fields), student)


def check_pretrained_student(pretrained: str, teacher, storage: Storage) -> None:
    """The pretrained student's config and tokenizer (no weights) must match the teacher's
    vocabulary and tokenizer; ``pretrained`` is a local folder, an fsspec URL or a hub id."""
    from transformers import AutoConfig

    from distill_core.student import check_pretrained_tokenizer

    try:
        folder = loadable(pretrained, storage, weights=False)
        vocab = AutoConfig.from_pretrained(folder).vocab_size
    except (OSError, ValueError) as e:
        raise TeacherError(
            f"cannot read the pretrained student {pretrained!r}: {e}. Check the path or hub id (a folder saved with save_pretrained)."
        ) from None
    if vocab != teacher.vocab_size:
        raise TeacherError(
            f"student vocabulary ({vocab} tokens, {pretrained}) differs from the teacher's "
            f"({teacher.vocab_size}): distillation needs a shared tokenizer; pick a student of the teacher's family."
        )
    check_pretrained_tokenizer(folder, pretrained, vocab, teacher.tokenizer_hash)


def check_cross_tokenizer(cfg: RunConfig, teacher, storage: Storage) -> str:
    """``student.tokenizer`` is set: name the case (see ``student.tokenizer_case``) and refuse what cannot
    work across tokenizers. Returns the case."""
    from distill_core.student import describe_case, load_student_tokenizer, tokenizer_case
    from distill_core.teacher.load import load_tokenizer

    student = cfg.student
    teacher_tok, student_tok = load_tokenizer(teacher, storage), load_student_tokenizer(student.tokenizer, storage)
    case = tokenizer_case(teacher_tok, student_tok)
    if case == "same":
        return case
    what = describe_case(case, teacher_tok, student_tok)
    from distill_core.tokens import check_roundtrip, token_bytes

    check_roundtrip(teacher_tok, token_bytes(teacher_tok), f"teacher {teacher.path}")
    check_roundtrip(student_tok, token_bytes(student_tok), f"student.tokenizer {student.tokenizer}")
    # the student's own samples would be in its tokens, which the teacher cannot grade: no translation yet
    unsupported = sorted(f"{t.name}@{t.on}" for t in cfg.train.losses if t.on == "student_samples")
    if unsupported:
        raise ConfigError(
            f"student.tokenizer {student.tokenizer} has {what}, and train.losses {unsupported} have no cross-tokenizer "
            "form yet: drop them (ce, seqkd, the beam terms, and the divergences and uld on the data or on teacher "
            "samples work across tokenizers)."
        )
    if cfg.topk.strategy != "topk" and any(t.source == "data" and t.name != "ce" for t in cfg.train.losses):
        raise ConfigError(
            f"student.tokenizer {student.tokenizer} has {what}: soft targets are carried across vocabularies from the "
            f"teacher's exact top-k, but topk.strategy is {cfg.topk.strategy!r}: set topk.strategy to 'topk'."
        )
    if student.init == "pretrained":
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(loadable(student.pretrained, storage, weights=False)).vocab_size
        if vocab < len(student_tok):
            raise TeacherError(
                f"student.tokenizer {student.tokenizer} has {len(student_tok)} tokens but the pretrained student "
                f"{student.pretrained} only {vocab} logits: name the tokenizer saved with that student."
            )
    return case
