"""Preflight: settings that cannot work with the teacher are refused before any teacher work."""

from __future__ import annotations

import pytest

from distill_core.config import PathTeacher, parse_config
from distill_core.errors import ConfigError, TeacherError
from distill_core.preflight import check_run, check_stage
from distill_core.storage import Storage
from distill_core.teacher.load import resolve_teacher


def _config(storage: Storage, teacher_path: str, **sections) -> object:
    raw = {"storage": {"root": storage.root, "options": storage.storage_options}, "teacher": {"kind": "path", "path": teacher_path}}
    return parse_config(raw | {"data": {"seq_len": 64}} | sections)


@pytest.fixture
def local(tmp_path, tiny_teacher_dir):
    storage = Storage(str(tmp_path / "root"))
    return storage, resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)


def _save_student(folder, tokenizer, vocab_size: int = 384) -> str:
    """A 1-layer GPT-2 saved with ``tokenizer`` (none: saved without one); returns the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_topk_wider_than_the_vocabulary_is_refused(local, tiny_teacher_dir):
    storage, ref = local
    check_run(_config(storage, str(tiny_teacher_dir), topk={"k": 384}), ref)  # every id: fine
    with pytest.raises(ConfigError, match="topk.k is 385 but the teacher's vocabulary has only 384 tokens: set topk.k to at most 384"):
        check_run(_config(storage, str(tiny_teacher_dir), topk={"k": 385}), ref)
    with pytest.raises(ConfigError, match="samples.soft_topk is 500 but the teacher's vocabulary has only 384 tokens"):
        check_run(_config(storage, str(tiny_teacher_dir), samples={"soft_topk": 500}), ref)
    check_stage("beams", object(), 384)  # beams take no top-k


def test_a_hybrid_top_k_leaves_a_tail_to_draw_from():
    from distill_core.config import TopKConfig

    with pytest.raises(ConfigError, match="topk.k 384 covers the whole 384-token vocabulary"):
        check_stage("topk", TopKConfig(strategy="hybrid", k=384), 384)
    check_stage("topk", TopKConfig(strategy="hybrid", k=383), 384)
    check_stage("topk", TopKConfig(strategy="sampled", k=1000), 384)  # sampled takes no top-k


def test_a_pretrained_student_with_another_tokenizer_is_refused(tmp_path, local, tiny_teacher_dir, tiny_tokenizer, other_tokenizer):
    storage, ref = local
    same = _save_student(tmp_path / "same", tiny_tokenizer)
    check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": same}), ref)

    other = _save_student(tmp_path / "other", other_tokenizer)
    with pytest.raises(TeacherError, match=f"student {other} has the teacher's vocabulary size but another tokenizer"):
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": other}), ref)

    bare = _save_student(tmp_path / "bare", None)
    with pytest.raises(TeacherError, match=f"student {bare}: the tokenizer has 1 token for a model of 384.*found none of them"):
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": bare}), ref)

    wide = _save_student(tmp_path / "wide", None, vocab_size=500)
    with pytest.raises(TeacherError, match=r"student vocabulary \(500 tokens"):
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": wide}), ref)


def test_teacher_and_pretrained_student_on_s3_are_read_with_the_storage_options(
    tmp_path, s3_storage, tiny_teacher_dir, tiny_tokenizer, other_tokenizer,
):
    s3_storage.upload_dir(tiny_teacher_dir, "teacher")
    s3_storage.upload_dir(_save_student(tmp_path / "same", tiny_tokenizer), "students/same")
    s3_storage.upload_dir(_save_student(tmp_path / "other", other_tokenizer), "students/other")
    teacher = s3_storage.url("teacher")
    ref = resolve_teacher(PathTeacher(path=teacher), s3_storage)

    check_run(_config(s3_storage, teacher, student={"init": "pretrained", "pretrained": s3_storage.url("students/same")}), ref)
    with pytest.raises(ConfigError, match="data.seq_len 512 exceeds the teacher's context of 256 tokens"):
        check_run(_config(s3_storage, teacher, data={"seq_len": 512}), ref)
    other = s3_storage.url("students/other")
    with pytest.raises(TeacherError, match="another tokenizer"):
        check_run(_config(s3_storage, teacher, student={"init": "pretrained", "pretrained": other}), ref)


def test_the_student_tokenizer_case_is_named(tmp_path, local, tiny_teacher_dir, tiny_tokenizer, other_tokenizer, small_tokenizer):
    from distill_core.preflight import check_cross_tokenizer
    from distill_core.student import describe_case, tokenizer_case

    storage, ref = local
    small = small_tokenizer
    assert tokenizer_case(tiny_tokenizer, tiny_tokenizer) == "same"
    assert tokenizer_case(tiny_tokenizer, other_tokenizer) == "same_size_other_tokens"
    assert tokenizer_case(tiny_tokenizer, small) == "other_vocabulary"
    assert "other tokens behind the same ids" in describe_case("same_size_other_tokens", tiny_tokenizer, other_tokenizer)

    # a student of the teacher's size with other tokens: refused without student.tokenizer, named with it
    other = _save_student(tmp_path / "other", other_tokenizer)
    with pytest.raises(TeacherError, match=f"or set student.tokenizer: {other} to distil across tokenizers"):
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": other}), ref)
    cfg = _config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": other, "tokenizer": other})
    check_run(cfg, ref)
    assert check_cross_tokenizer(cfg, ref, storage) == "same_size_other_tokens"

    small_dir = tmp_path / "small"
    small.save_pretrained(small_dir)
    cfg = _config(storage, str(tiny_teacher_dir), student={"init": "config", "num_layers": 1, "tokenizer": str(small_dir)})
    assert check_cross_tokenizer(cfg, ref, storage) == "other_vocabulary"
    same = _config(storage, str(tiny_teacher_dir), student={"init": "config", "tokenizer": str(tiny_teacher_dir)})
    assert check_cross_tokenizer(same, ref, storage) == "same"

    soft_on_samples = {"losses": [{"name": "ce"}, {"name": "forward_kl", "on": "samples"}, {"name": "uld", "on": "samples"}]}
    check_run(_config(storage, str(tiny_teacher_dir), student={"init": "config", "tokenizer": str(small_dir)},
                      train=soft_on_samples, samples={"soft_topk": 4}), ref)
    beams = {"losses": [{"name": "ce"}, {"name": "beam_rank"}, {"name": "beam_top1"}]}
    check_run(_config(storage, str(tiny_teacher_dir), student={"init": "config", "tokenizer": str(small_dir)}, train=beams), ref)
    own = {"init": "config", "tokenizer": str(small_dir)}
    on_policy = {"losses": [{"name": "ce"}, {"name": "reverse_kl", "on": "student_samples"}], "rounds": 2}
    with pytest.raises(ConfigError, match=r"\['reverse_kl@student_samples'\] have no cross-tokenizer form"):
        check_run(_config(storage, str(tiny_teacher_dir), student=own, train=on_policy, data={"seq_len": 64}), ref)
    sampled = {"losses": [{"name": "ce"}, {"name": "forward_kl"}]}
    with pytest.raises(ConfigError, match="topk.strategy is 'sampled': set topk.strategy to 'topk'"):
        check_run(_config(storage, str(tiny_teacher_dir), student=own, train=sampled, topk={"strategy": "sampled"}), ref)
    with pytest.raises(TeacherError, match="cannot load student.tokenizer"):
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "config", "tokenizer": str(tmp_path / "none")}), ref)
    with pytest.raises(TeacherError, match="has 384 tokens but the pretrained student .* only 300 logits"):
        tiny = _save_student(tmp_path / "tiny", small, vocab_size=300)
        check_run(_config(storage, str(tiny_teacher_dir), student={"init": "pretrained", "pretrained": tiny, "tokenizer": other}), ref)
