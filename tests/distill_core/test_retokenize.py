import numpy as np
import pytest

from distill_core.align import align
from distill_core.retokenize import Retokenized, Retokenizer, student_targets

TEXT = "héllo world, def f(x): return x\n\nThe end."


def _row(tok):
    return np.array(tok(TEXT)["input_ids"] + [tok.eos_token_id] + tok("Next doc é")["input_ids"])


def _targets(ids, k=4, seed=0):
    """Top-k over a row's positions with the actual next token first at probability 0.4, three others at 0.1."""
    rng = np.random.default_rng(seed)
    top = rng.integers(1, 384, (len(ids) - 1, k))
    top[:, 0] = ids[1:]
    lps = np.log(np.array([[0.4, 0.1, 0.1, 0.1]] * (len(ids) - 1), dtype=np.float32))
    return top, lps, np.log(np.full(len(ids) - 1, 0.3, dtype=np.float32))


def test_identical_tokenizers_give_the_teacher_row_and_targets_exactly(tiny_tokenizer):
    ids = _row(tiny_tokenizer)
    r = Retokenizer(tiny_tokenizer, tiny_tokenizer)
    row = r.rows([ids])[0]
    assert np.array_equal(row.ids, ids)
    top, lps, tail = _targets(ids)
    out = student_targets(row, ids, top, lps, tail, r.teacher_to_student)
    assert np.array_equal(out["topk_ids"], top) and np.array_equal(out["topk_logprobs"], lps)
    assert np.array_equal(out["tail_logprob"], tail) and out["valid"].all() and out["soft"].all()


def test_another_tokenizer_spells_the_same_text(tiny_tokenizer, small_tokenizer):
    ids = _row(tiny_tokenizer)
    r = Retokenizer(tiny_tokenizer, small_tokenizer)
    whole, cut_start, cut_end = r.rows([ids, ids[2:], ids[:-1]])  # ids[1:3] are the two bytes of "é"
    assert small_tokenizer.decode(whole.ids) == tiny_tokenizer.decode(ids)
    assert small_tokenizer.eos_token_id in whole.ids.tolist()
    assert small_tokenizer.decode(cut_start.ids).startswith("llo world")  # the cut character is left out
    assert small_tokenizer.decode(cut_end.ids).endswith("Next doc ")
    assert (whole.alignment.teacher_block >= 0).all() and (whole.alignment.student_block >= 0).all()
    top, lps, tail = _targets(ids)
    out = student_targets(whole, ids, top, lps, tail, r.teacher_to_student)
    n = len(whole.ids) - 1
    assert out["topk_ids"].shape == (n, 4) and out["soft"].shape == (n,)
    assert (out["topk_ids"][out["valid"]] < len(small_tokenizer)).all()
    total = np.exp(np.where(out["valid"], out["topk_logprobs"], -np.inf)).sum(-1) + np.exp(out["tail_logprob"])
    assert np.allclose(total[out["soft"]], 1.0, atol=1e-5)  # every target a distribution
    assert out["uld"].sum() >= out["soft"].sum() > n // 2


def _hand(teacher_pieces, student_pieces, student_ids):
    def spans(pieces):
        ends = np.cumsum([len(p) for p in pieces])
        return np.stack([ends - [len(p) for p in pieces], ends], 1)

    return Retokenized(np.array(student_ids), spans(student_pieces), align(spans(teacher_pieces), spans(student_pieces)))


def test_one_to_many_takes_the_chained_probability():
    # teacher "The" "un" "believ" "able"; student "The" "unbelievable" (student ids 0, 1)
    teacher_ids = np.array([10, 11, 12, 13])
    row = _hand(["The", "un", "believ", "able"], ["The", "unbelievable"], [0, 1])
    top = np.array([[11, 20], [12, 21], [13, 22]])
    lps = np.log(np.array([[0.5, 0.2], [0.6, 0.1], [0.9, 0.05]], dtype=np.float32))
    tail = np.log(np.array([0.3, 0.3, 0.05], dtype=np.float32))
    to_student = np.full(30, -1)
    to_student[20] = 5  # teacher id 20 spells a student token; 11 ("un") does not
    out = student_targets(row, teacher_ids, top, lps, tail, to_student)
    assert out["soft"].tolist() == [True]
    valid = out["valid"][0]
    got = dict(zip(out["topk_ids"][0][valid].tolist(), np.exp(out["topk_logprobs"][0][valid]).tolist()))
    assert got == pytest.approx({5: 0.2, 1: 0.5 * 0.6 * 0.9})
    assert np.exp(out["tail_logprob"][0]) == pytest.approx(1 - 0.2 - 0.27)
    assert np.exp(out["uld_logprobs"][0]).tolist() == pytest.approx([0.5, 0.2])  # the teacher's own sorted top-k


def test_many_to_one_student_tokens_share_the_probability():
    # teacher "The" "unbelievable"; student "The" "un" "believ" "able" (student ids 0..3)
    teacher_ids = np.array([10, 11])
    row = _hand(["The", "unbelievable"], ["The", "un", "believ", "able"], [0, 1, 2, 3])
    top, lps, tail = np.array([[11, 20]]), np.log(np.array([[0.512, 0.2]], dtype=np.float32)), np.log(np.array([0.288], dtype=np.float32))
    to_student = np.full(30, -1)
    out = student_targets(row, teacher_ids, top, lps, tail, to_student)
    shared = 0.512 ** (1 / 3)
    assert out["soft"].tolist() == [True, True, True]
    for j, actual in enumerate([1, 2, 3]):
        valid = out["valid"][j]
        got = dict(zip(out["topk_ids"][j][valid].tolist(), np.exp(out["topk_logprobs"][j][valid]).tolist()))
        assert got == pytest.approx({actual: shared}, rel=1e-5)
        assert np.exp(out["tail_logprob"][j]) == pytest.approx(1 - shared, rel=1e-5)


def test_identical_tokenizers_reduce_exactly_to_todays_loss(tiny_tokenizer, tiny_teacher):
    import torch

    from distill_core.batches import StepBatch, collate_data
    from distill_core.config import LossTerm
    from distill_core.losses.divergence import topk_targets_from_logits
    from distill_core.train import loss_step

    ids = _row(tiny_tokenizer)
    rows = [ids[:20], ids[20:40]]
    with torch.no_grad():
        t = topk_targets_from_logits(tiny_teacher(input_ids=torch.tensor(np.stack(rows), dtype=torch.long)).logits[:, :-1], 8, 1.0)
    data = [{"input_ids": r, "topk_ids": t.ids[i].numpy(), "topk_logprobs": t.logprobs[i].numpy(), "tail_logprob": t.tail_logprob[i].numpy()}
            for i, r in enumerate(rows)]
    today = collate_data(data)
    across = Retokenizer(tiny_tokenizer, tiny_tokenizer).collate_data(data, pad_id=0)
    assert torch.equal(across.input_ids, today.input_ids.long()) and across.soft_mask.all()
    terms = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5), LossTerm(name="uld", weight=0.25)]
    for chunk in (None, 7):
        a_total, a_parts = loss_step(tiny_teacher, StepBatch(data=across), terms, tail="bucket", temperatures={}, chunk_rows=chunk)
        b_total, b_parts = loss_step(tiny_teacher, StepBatch(data=today), terms, tail="bucket", temperatures={}, chunk_rows=chunk)
        assert torch.equal(a_total, b_total)
        assert all(torch.equal(a_parts[n], b_parts[n]) for n in b_parts)


def test_beam_candidates_are_masked_to_the_candidates_text_in_the_students_tokens(tiny_tokenizer, small_tokenizer):
    from distill_core.batches import collate_beams

    prompt = np.array(tiny_tokenizer("def f(x):")["input_ids"])
    candidates = [np.array(tiny_tokenizer(t)["input_ids"]) for t in (" return x", " pass", " return héllo")]
    rows = [{"prompt_ids": prompt, "candidates": candidates, "scores": np.array([-0.5, -1.0, -2.0], np.float32)}]
    same = Retokenizer(tiny_tokenizer, tiny_tokenizer)
    a, b = collate_beams(rows, 0), collate_beams(rows, 0, samples=lambda flat: same.collate_samples(flat, 0))
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)  # identical tokenizers: as today
    other = Retokenizer(tiny_tokenizer, small_tokenizer)
    batch = collate_beams(rows, 0, samples=lambda flat: other.collate_samples(flat, 0))
    assert batch.is_top1.tolist() == [True, False, False] and batch.teacher_scores.tolist() == [[-0.5, -1.0, -2.0]]
    for i, text in enumerate((" return x", " pass", " return héllo")):
        ids = batch.input_ids[i]
        kept = ids[1:][batch.loss_mask[i]].tolist()  # the tokens the loss scores: the candidate's, in student ids
        assert small_tokenizer.decode(kept) == text
        assert small_tokenizer.decode(ids[: len(ids) - len(kept)][: len(small_tokenizer("def f(x):")["input_ids"])].tolist()) == "def f(x):"


def test_a_generated_completion_is_cut_before_its_first_byte_that_is_not_text(tiny_tokenizer, small_tokenizer):
    r = Retokenizer(tiny_tokenizer, small_tokenizer)
    invalid = next(i for i, b in enumerate(r.t_table) if b == b"\xff")  # never valid UTF-8
    prompt = np.array(tiny_tokenizer("def f(x):")["input_ids"])
    completion = np.array(tiny_tokenizer(" return é")["input_ids"] + [invalid] + tiny_tokenizer(" more")["input_ids"])
    batch = r.collate_samples([{"prompt_ids": prompt, "completion_ids": completion}], 0)
    assert small_tokenizer.decode(batch.input_ids[0, 1:][batch.loss_mask[0]].tolist()) == " return é"
    whole = np.array(tiny_tokenizer(" return é more")["input_ids"])
    batch = r.collate_samples([{"prompt_ids": prompt, "completion_ids": whole}], 0)
    assert small_tokenizer.decode(batch.input_ids[0, 1:][batch.loss_mask[0]].tolist()) == " return é more"


def _sample_rows(tok, p=6):
    """One teacher row as data (top-k over every position) and as a sample: its first p tokens the prompt,
    the rest the completion with the top-k of the positions predicting it."""
    ids = _row(tok)
    top, lps, tail = _targets(ids)
    data = {"input_ids": ids, "topk_ids": top, "topk_logprobs": lps, "tail_logprob": tail}
    sample = {"prompt_ids": ids[:p], "completion_ids": ids[p:], "topk_ids": top[p - 1 :], "topk_logprobs": lps[p - 1 :],
              "tail_logprob": tail[p - 1 :]}
    return data, sample


def test_soft_targets_on_samples_with_identical_tokenizers_are_todays(tiny_tokenizer):
    from distill_core.batches import collate_samples

    _, sample = _sample_rows(tiny_tokenizer)
    today = collate_samples([sample], 0)
    batch = Retokenizer(tiny_tokenizer, tiny_tokenizer).collate_samples([sample], 0)
    assert np.array_equal(batch.input_ids, today.input_ids) and np.array_equal(batch.loss_mask, today.loss_mask)
    m = today.loss_mask
    assert np.array_equal(batch.soft_mask, m) and np.array_equal(batch.uld_mask, m)
    for name in ("ids", "logprobs", "tail_logprob"):
        assert np.array_equal(getattr(batch.targets, name)[m], getattr(today.targets, name)[m])


def test_soft_targets_on_samples_across_tokenizers_are_the_datas_inside_the_completion(tiny_tokenizer, small_tokenizer):
    data, sample = _sample_rows(tiny_tokenizer)
    r = Retokenizer(tiny_tokenizer, small_tokenizer)
    whole, part = r.collate_data([data], 0), r.collate_samples([sample], 0)
    assert np.array_equal(whole.input_ids, part.input_ids)  # the same text in the student's tokens
    soft = part.soft_mask[0]
    assert soft.sum() > 10 and not (soft & ~whole.soft_mask[0]).any() and not (soft & ~part.loss_mask[0]).any()
    for name in ("ids", "logprobs", "tail_logprob", "valid"):
        assert np.array_equal(getattr(part.targets, name)[0][soft], getattr(whole.targets, name)[0][soft])
    uld = part.uld_mask[0]
    assert np.array_equal(part.uld_targets.logprobs[0][uld], whole.uld_targets.logprobs[0][uld])
    # no target where the student token's block starts in the prompt: the first student position left
    prompt_bytes = int(r.t_len[sample["prompt_ids"]].sum())
    student = r.rows([data["input_ids"]])[0]
    starts = student.alignment.teacher_start[student.alignment.student_block[1:]]
    assert not soft[: len(starts)][starts < len(sample["prompt_ids"])].any()
    assert (student.spans[1:, 1][soft[: len(student.ids) - 1].numpy()] > prompt_bytes).all()


def test_a_cut_completion_cuts_its_soft_targets_too(tiny_tokenizer, small_tokenizer):
    r = Retokenizer(tiny_tokenizer, small_tokenizer)
    invalid = next(i for i, b in enumerate(r.t_table) if b == b"\xff")
    _, sample = _sample_rows(tiny_tokenizer)
    completion = np.concatenate([sample["completion_ids"][:5], [invalid], sample["completion_ids"][5:]])
    k = sample["topk_ids"].shape[1]
    cut = r._text_completion({**sample, "completion_ids": completion,
                              **{n: np.concatenate([sample[n][:5], sample[n][:1], sample[n][5:]]) for n in ("topk_ids", "topk_logprobs", "tail_logprob")}})
    assert len(cut["completion_ids"]) == 5 and cut["topk_ids"].shape == (5, k) and len(cut["tail_logprob"]) == 5
    batch = r.collate_samples([cut], 0)
    assert batch.soft_mask.any()
