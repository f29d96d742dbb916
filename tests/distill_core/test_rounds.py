"""On-policy rounds in one process over the tiny teacher: addresses, no repeated work, resume, lineage."""

import pytest
import torch
from safetensors.torch import load_file

from distill_core.config import DataConfig, LossTerm, PathTeacher, StudentConfig, StudentSamplesConfig, TopKConfig, TrainConfig
from distill_core.data import prepare_data
from distill_core.errors import CacheError
from distill_core.rounds import on_policy_step, rounds_folder, sample_round, start_rounds, train_round
from distill_core.storage import Storage
from distill_core.teacher.load import load_teacher, resolve_teacher
from distill_core.teacher.topk import cache_topk

pytestmark = pytest.mark.usefixtures("one_thread")

TERMS = [LossTerm(name="reverse_kl", on="student_samples"), LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]
TRAIN = TrainConfig(losses=TERMS, steps=8, rounds=2, batch_size=2, warmup_steps=1, checkpoint_every=3, baseline=False,
                    on_policy_fraction=0.5)
SAMPLES = StudentSamplesConfig(prompt_len=8, num_prompts=6, num_samples=1, max_new_tokens=6, batch_size=4)
TOPK = TopKConfig(k=4, batch_size=4)
STUDENT = StudentConfig(init="teacher_layers", layers=[0, 3])


def test_steps_of_a_round_alternate_at_one_half_and_are_all_on_policy_at_one():
    assert [on_policy_step(s, TRAIN) for s in range(8)] == [False, True] * 4
    every = TRAIN.model_copy(update={"losses": TERMS[:1], "on_policy_fraction": 1.0})
    assert all(on_policy_step(s, every) for s in range(8))
    quarter = TRAIN.model_copy(update={"on_policy_fraction": 0.25})
    assert [on_policy_step(s, quarter) for s in range(4)] == [False, False, False, True]


class Run:
    def __init__(self, root, teacher_dir, tokenizer):
        self.storage = Storage(str(root))
        self.ref = resolve_teacher(PathTeacher(path=str(teacher_dir)), self.storage)
        self.data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=24,
                                            max_validation_sequences=4), tokenizer, self.ref.tokenizer_hash, self.storage)
        self.teacher_loads = 0
        self.caches = {"topk": cache_topk(self.load, self.data, self.ref.to_dict(), TOPK, self.storage)}
        self.out, self.used = rounds_folder("student", TERMS, STUDENT, TRAIN, SAMPLES, TOPK, self.ref, self.data, self.caches, None)

    def load(self):
        self.teacher_loads += 1
        return load_teacher(self.ref, self.storage)[0]

    def sample(self, r):
        return sample_round(r, self.out, SAMPLES, TOPK, self.ref.to_dict(), self.data, self.storage, self.load)

    def train(self, r, graded, fail_at_step=None):
        return train_round(r, "student", TERMS, self.out, TRAIN, self.storage, self.ref, self.data, self.used, graded,
                           fail_at_step=fail_at_step)

    def all(self, fail_at_step=None):
        start_rounds(self.out, STUDENT, TRAIN, self.storage, self.ref, self.data, None)
        return [self.train(r, self.sample(r), fail_at_step=fail_at_step) for r in (1, 2)]

    def weights(self):
        return load_file(self.storage.local_path(f"{self.out}/model/model.safetensors"))


def test_two_rounds_new_student_new_cache_rerun_no_work_and_a_kill_in_round_two_resumes_there(
        tmp_path, tiny_teacher_dir, tiny_tokenizer):
    whole = Run(tmp_path / "whole", tiny_teacher_dir, tiny_tokenizer)
    records = whole.all()
    first, second = records
    assert first["cache"]["folder"] != second["cache"]["folder"]  # round 2 samples with the trained student
    assert first["cache"]["meta"]["student_fingerprint"] != second["cache"]["meta"]["student_fingerprint"]
    assert second["cache"]["meta"]["student_fingerprint"] == first["student_fingerprint"]
    assert first["student_fingerprint"] != second["student_fingerprint"]
    assert first["result"]["steps"] == 4 and second["result"]["steps"] == 8
    assert first["metrics"]["samples_tokens"] > 0 and "reverse_kl@student_samples" in first["metrics"]
    assert "forward_kl" in first["metrics"] and first["metrics"]["samples_teacher_nll"] > 0

    loads = whole.teacher_loads
    again = whole.all()  # rerun: every round is there; nothing is sampled, graded or trained
    assert whole.teacher_loads == loads and [r["student_fingerprint"] for r in again] == [r["student_fingerprint"] for r in records]

    killed = Run(tmp_path / "killed", tiny_teacher_dir, tiny_tokenizer)
    start_rounds(killed.out, STUDENT, TRAIN, killed.storage, killed.ref, killed.data, None)
    killed.train(1, killed.sample(1))
    graded = killed.sample(2)
    with pytest.raises(RuntimeError, match="injected failure after step 7"):
        killed.train(2, graded, fail_at_step=7)
    resumed = killed.train(2, killed.sample(2))
    assert resumed["result"]["resumed_from_step"] == 6  # the checkpoint inside round 2, not round 1's end
    assert resumed["cache"]["folder"] == second["cache"]["folder"]
    a, b = whole.weights(), killed.weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_round_before_its_predecessor_is_refused(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    run = Run(tmp_path / "root", tiny_teacher_dir, tiny_tokenizer)
    with pytest.raises(CacheError, match="run the first round's sample_round first"):
        run.sample(1)
    start_rounds(run.out, STUDENT, TRAIN, run.storage, run.ref, run.data, None)
    with pytest.raises(CacheError, match="run train_round 1 first"):
        run.sample(2)
