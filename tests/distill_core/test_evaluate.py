import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_core.config import DataConfig, EvalConfig
from distill_core.data import prepare_data
from distill_core.errors import DataError
from distill_core.evaluate import (
    add_intervals, calibration_bins, compare, evaluate, expected_calibration_error, paired, per_sequence,
)
from distill_core.storage import Storage

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with seeded Gaussian noise on every weight: another model of the same shape."""
    out, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _scored(nll, tokens, seq_ids=None):
    seq_ids = list(range(len(nll))) if seq_ids is None else seq_ids
    return {"val_ppl": math.exp(sum(nll) / sum(tokens)),
            "per_sequence": {"seq_id": seq_ids, "nll": list(nll), "tokens": list(tokens)}}


def test_add_intervals_on_hand_made_scores():
    # teacher 0, baseline 2, student 1 nat per token on both sequences
    metrics = {"teacher": _scored([0.0, 0.0], [1, 1]), "student": _scored([1.0, 1.0], [1, 1]),
               "baseline": _scored([2.0, 2.0], [1, 1])}
    out = add_intervals(metrics)
    s, b, t = out["student"], out["baseline"], out["teacher"]
    assert (t["val_ppl_low"], t["val_ppl_high"]) == (1.0, 1.0)
    assert (s["val_ppl_low"], s["val_ppl_high"]) == pytest.approx((math.e, math.e))
    assert (s["ppl_ratio_vs_teacher"], s["ppl_ratio_vs_teacher_low"], s["ppl_ratio_vs_teacher_high"]) == pytest.approx((math.e,) * 3)
    assert (s["ppl_ratio_vs_baseline"], s["ppl_ratio_vs_baseline_high"]) == pytest.approx((1 / math.e, 1 / math.e))
    assert (s["kd_gap_closed"], s["kd_gap_closed_low"], s["kd_gap_closed_high"]) == (0.5, 0.5, 0.5)
    assert b["ppl_ratio_vs_teacher"] == pytest.approx(math.e ** 2)
    assert "ppl_ratio_vs_baseline" not in b and "kd_gap_closed" not in b and "ppl_ratio_vs_teacher" not in t
    assert "val_ppl_low" not in metrics["student"]  # the input is not modified


def test_gap_closed_is_none_without_a_clear_teacher_lead_and_absent_without_a_baseline():
    metrics = {"teacher": _scored([2.0, 2.0], [1, 1]), "student": _scored([1.0, 1.0], [1, 1]),
               "baseline": _scored([2.0, 2.0], [1, 1])}
    out = add_intervals(metrics)
    assert (out["student"]["kd_gap_closed"], out["student"]["kd_gap_closed_low"]) == (None, None)
    alone = add_intervals({"teacher": metrics["teacher"], "student": metrics["student"]}, baseline="baseline")
    assert "ppl_ratio_vs_baseline" not in alone["student"] and "ppl_ratio_vs_teacher" in alone["student"]


def test_paired_refuses_models_scored_on_different_sequences():
    with pytest.raises(DataError, match="different validation sequences"):
        paired(_scored([1.0, 2.0], [1, 1], seq_ids=[0, 1]), _scored([1.0, 2.0], [1, 1], seq_ids=[0, 2]))
    with pytest.raises(DataError, match="rerun the evaluate stage"):
        paired({"val_ppl": 3.0}, _scored([1.0], [1]))


def test_compare_keeps_the_nll_of_every_sequence(tiny_tokenizer, tiny_teacher):
    vocab = len(tiny_tokenizer)
    teacher, other = tiny_teacher, _perturbed(tiny_teacher, 0.05, seed=1)
    ids = torch.randint(0, vocab, (5, 12), generator=torch.Generator().manual_seed(0))
    batches = [(np.array([10, 11, 12]), ids[:3]), (np.array([13, 14]), ids[3:])]
    out = compare(teacher, {"same": copy.deepcopy(teacher), "other": other}, iter(batches), "cpu")
    seq_ids, nll, tokens = per_sequence(out["other"])
    assert seq_ids == [10, 11, 12, 13, 14] and tokens.tolist() == [11] * 5
    with torch.no_grad():
        logits = other(input_ids=ids).logits[:, :-1]
        expected = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none").view(5, 11).sum(1)
    np.testing.assert_allclose(nll, expected.double().numpy(), rtol=1e-5)
    assert out["other"]["val_ppl"] == pytest.approx(math.exp(nll.sum() / 55))
    assert out["teacher"]["val_tokens"] == 55 and out["teacher"]["val_sequences"] == 5
    same = paired(out["same"], out["teacher"])  # the teacher's copy: exactly the teacher's NLL
    assert same.ratio.estimate == same.ratio.low == same.ratio.high == 1.0 and not same.significant


@pytest.mark.parametrize("chunk_rows", [7, 22, 1000])  # 22 rows a batch of two: chunks that do and do not divide it
def test_compare_through_the_lm_head_in_chunks_equals_full_logits(tiny_tokenizer, tiny_teacher, chunk_rows):
    vocab = len(tiny_tokenizer)
    students = {"a": _perturbed(tiny_teacher, 0.05, seed=1), "b": _perturbed(tiny_teacher, 0.2, seed=2)}
    ids = torch.randint(0, vocab, (5, 12), generator=torch.Generator().manual_seed(3))
    batches = [(np.array([0, 1]), ids[:2]), (np.array([2, 3, 4]), ids[2:])]
    full = compare(tiny_teacher, students, iter(batches), "cpu")
    chunked = compare(tiny_teacher, students, iter(batches), "cpu", chunk_rows=chunk_rows)
    for name in ("teacher", "a", "b"):
        np.testing.assert_allclose(chunked[name]["per_sequence"]["nll"], full[name]["per_sequence"]["nll"], rtol=1e-5)
        assert chunked[name]["val_ppl"] == pytest.approx(full[name]["val_ppl"], rel=1e-5)
        assert chunked[name]["ece"] == pytest.approx(full[name]["ece"], abs=1e-9) and 0 < full[name]["ece"] < 1
    for name in ("a", "b"):
        assert chunked[name]["top1_agreement"] == full[name]["top1_agreement"]
        assert chunked[name]["kl_to_teacher"] == pytest.approx(full[name]["kl_to_teacher"], rel=1e-4)
    assert full["b"]["kl_to_teacher"] > full["a"]["kl_to_teacher"] > 0


def test_evaluate_reports_intervals_that_can_be_recomputed_from_the_stored_file(tmp_path, tiny_tokenizer, tiny_teacher):
    storage = Storage(str(tmp_path))
    data = prepare_data(DataConfig(seq_len=16, rows_per_shard=8, max_train_sequences=8, max_validation_sequences=12),
                        tiny_tokenizer, "tokhash", storage)
    teacher = copy.deepcopy(tiny_teacher)
    students = {"student": _perturbed(teacher, 0.05, seed=1), "baseline": _perturbed(teacher, 0.1, seed=2)}
    cfg = EvalConfig(max_sequences=10, batch_size=4, speed_tokens=16, bootstrap_resamples=500)
    metrics = evaluate(teacher, students, storage, data, cfg, "cpu")
    for name, m in metrics.items():
        assert len(m["per_sequence"]["nll"]) == 10
        assert m["val_ppl_low"] <= m["val_ppl"] <= m["val_ppl_high"]
    s = metrics["student"]
    assert s["ppl_ratio_vs_baseline_low"] <= s["ppl_ratio_vs_baseline"] <= s["ppl_ratio_vs_baseline_high"]
    assert s["ppl_ratio_vs_baseline"] == pytest.approx(s["val_ppl"] / metrics["baseline"]["val_ppl"])
    assert s["ppl_ratio_vs_teacher"] == pytest.approx(s["val_ppl"] / metrics["teacher"]["val_ppl"])
    log_ppl = {name: math.log(m["val_ppl"]) for name, m in metrics.items()}
    share = (log_ppl["baseline"] - log_ppl["student"]) / (log_ppl["baseline"] - log_ppl["teacher"])
    assert s["kd_gap_closed"] == pytest.approx(share)
    assert s["kd_gap_closed_low"] < s["kd_gap_closed"] < s["kd_gap_closed_high"]
    assert "ppl_ratio_vs_baseline" not in metrics["baseline"] and "kd_gap_closed" not in metrics["baseline"]
    for m in metrics.values():  # each sequence's calibration sums add up to the ECE's
        stats = np.asarray(m["per_sequence"]["calibration"])
        assert stats.shape == (10, 3, 15) and stats[:, 0].sum() == metrics["teacher"]["val_tokens"]
        assert m["ece"] == pytest.approx(np.abs(stats[:, 1].sum(0) - stats[:, 2].sum(0)).sum() / stats[:, 0].sum())
        assert m["ece_low"] <= m["ece"] <= m["ece_high"]
    assert s["ece_vs_baseline"] == pytest.approx(s["ece"] - metrics["baseline"]["ece"])
    assert s["ece_vs_baseline_low"] <= s["ece_vs_baseline"] <= s["ece_vs_baseline_high"]

    storage.write_json("runs/r/stages/evaluate.json", metrics)  # as the evaluate stage records it
    stored = storage.read_json("runs/r/stages/evaluate.json")
    again = paired(stored["student"], stored["baseline"], resamples=500).ratio
    assert (again.estimate, again.low, again.high) == (s["ppl_ratio_vs_baseline"], s["ppl_ratio_vs_baseline_low"],
                                                       s["ppl_ratio_vs_baseline_high"])


def test_expected_calibration_error_on_a_hand_made_case():
    # Confidences 0.95, 0.95 (bin 14 of 15), 0.65, 0.65 (bin 9) and 1.0 (the top bin, closed).
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.65, 0.35, 0.0], [0.35, 0.0, 0.65], [0.0, 1.0, 0.0]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1])  # right, right, right, wrong, right
    stats = calibration_bins(probs.log(), labels)
    assert stats.shape == (3, 15)
    assert stats[0, 14].item() == 3 and stats[0, 9].item() == 2 and stats[0].sum().item() == 5
    assert stats[2, 14].item() == 3 and stats[2, 9].item() == 1
    # bin 14: |3 − (0.95 + 0.95 + 1)| = 0.1; bin 9: |1 − 1.3| = 0.3; over 5 positions
    assert expected_calibration_error(stats) == pytest.approx(0.4 / 5)
    # chunk sums add up to the whole, and so do the sums of groups (positions 0-1 and 2-4)
    halves = calibration_bins(probs[:2].log(), labels[:2]) + calibration_bins(probs[2:].log(), labels[2:])
    torch.testing.assert_close(halves, stats)
    grouped = calibration_bins(probs.log(), labels, groups=torch.tensor([0, 0, 1, 1, 1]), n_groups=2)
    assert grouped.shape == (2, 3, 15)
    torch.testing.assert_close(grouped[0], calibration_bins(probs[:2].log(), labels[:2]))
    torch.testing.assert_close(grouped.sum(0), stats)


def test_expected_calibration_error_is_zero_when_calibrated():
    # ten positions at confidence 0.5 of which 5 are right, ten at 0.8 of which 8 are right
    probs = torch.tensor([[0.5, 0.5]] * 10 + [[0.8, 0.2]] * 5 + [[0.2, 0.8]] * 5, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 5 + [0, 0, 0, 0, 1] + [1, 1, 1, 1, 0])
    assert expected_calibration_error(calibration_bins(probs.float().log(), labels)) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(calibration_bins(probs.float().log(), 1 - labels)) == pytest.approx(0.6 * 10 / 20, abs=1e-6)
