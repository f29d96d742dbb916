import numpy as np
import pytest
import torch

from distill_core.batches import collate_samples
from distill_core.cache.ref import shards_for
from distill_core.cache.stage import plan, run_all
from distill_core.config import StudentSamplesConfig, TopKConfig
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.errors import ConfigError
from distill_core.teacher.grade import grade, student_samples_job, student_samples_ref, teacher_nll, weights_fingerprint
from distill_core.teacher.samples_cache import read_samples_table
from distill_core.train import train_step
from distill_core.config import LossTerm, TrainConfig
from tests.conftest import build_tiny_gpt2

TEACHER = {"source": "path:tiny", "fingerprint": "t" * 16, "eos_token_id": 0, "dtype": "float32"}
CFG = StudentSamplesConfig(prompt_len=8, num_prompts=6, num_samples=2, max_new_tokens=5, batch_size=4)
TOPK = TopKConfig(k=4, temperature=2.0, batch_size=3)


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return build_tiny_gpt2(len(tiny_tokenizer), n_layer=1, seed=7)


def _graded(prepared, tiny_teacher, student):
    storage, data = prepared
    job = student_samples_job(CFG, TOPK, TEACHER, data, weights_fingerprint(student), lambda device: student)
    return storage, data, job, run_all(job, lambda: tiny_teacher, data, storage)


def test_graded_targets_equal_the_teachers_topk_on_the_students_text(prepared, tiny_teacher, student):
    storage, data, _, ref = _graded(prepared, tiny_teacher, student)
    names = shards_for(ref, storage, data.train, rows=CFG.num_prompts)
    table = ref.open(storage).read_shard(names[0])
    rows = read_samples_table(table, TOPK.k)
    assert len(names) == 1 and table.num_rows == 12  # the 6 prompts (all in the first shard of 8) × 2 samples
    teacher_lps = table["teacher_logprobs"].to_pylist()
    for i in range(table.num_rows):
        prompt, completion = rows["prompt_ids"][i].astype(np.int64), rows["completion_ids"][i].astype(np.int64)
        seq = torch.from_numpy(np.concatenate([prompt, completion]))[None]
        with torch.no_grad():  # the sequence alone, no padding
            direct = topk_targets_from_logits(tiny_teacher(input_ids=seq).logits[:, :-1], TOPK.k, TOPK.temperature)
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        assert np.array_equal(rows["topk_ids"][i], direct.ids[0, at].numpy())
        np.testing.assert_allclose(rows["topk_logprobs"][i], direct.logprobs[0, at].numpy(), atol=2e-3)  # float16 storage
        np.testing.assert_allclose(rows["tail_logprob"][i], direct.tail_logprob[0, at].numpy(), atol=1e-5)
        with torch.no_grad():
            full = torch.log_softmax(tiny_teacher(input_ids=seq).logits[0, :-1], -1)
        token_lp = full[at].gather(-1, torch.from_numpy(completion)[:, None])[:, 0]
        np.testing.assert_allclose(teacher_lps[i], token_lp.numpy(), atol=1e-5)
    nll = teacher_nll(storage, ref)
    assert nll["tokens"] == sum(len(c) for s in names for c in ref.open(storage).read_shard(s)["completion_ids"].to_pylist())
    assert nll["teacher_nll"] > 0


def test_the_address_follows_the_students_weights_and_a_rerun_does_no_work(prepared, tiny_teacher, student, tiny_tokenizer):
    storage, data, job, ref = _graded(prepared, tiny_teacher, student)
    assert plan(job, data, storage) == []
    calls = []
    again = run_all(student_samples_job(CFG, TOPK, TEACHER, data, weights_fingerprint(student), lambda d: calls.append(d)),
                    lambda: calls.append("teacher"), data, storage)
    assert again == ref and calls == []  # same student: nothing loaded, nothing computed
    other = build_tiny_gpt2(len(tiny_tokenizer), n_layer=1, seed=8)
    assert weights_fingerprint(other) != weights_fingerprint(student)
    assert student_samples_ref(CFG, TOPK, TEACHER, data, weights_fingerprint(other)).folder != ref.folder
    assert student_samples_ref(CFG.model_copy(update={"batch_size": 1}), TOPK, TEACHER, data, weights_fingerprint(student)) == ref
    with pytest.raises(ConfigError, match="prompt_len 24 must be below data.seq_len 24"):
        student_samples_ref(CFG.model_copy(update={"prompt_len": 24}), TOPK, TEACHER, data, "x")


def test_batched_grading_equals_one_sequence_at_a_time(tiny_teacher):
    prompts, completions = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[1, 2], [3, 4, 5, 6], [7]]
    batched = grade(tiny_teacher, prompts, completions, k=4, temperature=1.0, batch_size=3, pad_id=0)
    alone = [grade(tiny_teacher, [p], [c], k=4, temperature=1.0, batch_size=1, pad_id=0)[0] for p, c in zip(prompts, completions)]
    for b, a, c in zip(batched, alone, completions):
        assert b.ids.shape == (len(c), 4) and np.array_equal(b.ids, a.ids)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-5)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "uld"])
def test_padded_positions_of_graded_batches_give_finite_losses_and_gradients(prepared, tiny_teacher, student, loss):
    storage, data, _, ref = _graded(prepared, tiny_teacher, student)
    rows = read_samples_table(ref.open(storage).read_shard(shards_for(ref, storage, data.train, CFG.num_prompts)[0]), TOPK.k)
    batch = collate_samples([{k: v[i] for k, v in rows.items()} for i in range(8)], pad_id=0)
    assert not batch.loss_mask.all()  # some rows are padded
    model = build_tiny_gpt2(384, n_layer=1, seed=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = [LossTerm(name=loss, on="student_samples")]
    from distill_core.batches import StepBatch

    sums = train_step(model, model, optimizer, [StepBatch({"student_samples": batch})], terms,
                      TrainConfig(losses=terms, on_policy_fraction=1.0), temperatures={"student_samples": TOPK.temperature})
    assert np.isfinite(sums["loss"]) and sums["loss"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
