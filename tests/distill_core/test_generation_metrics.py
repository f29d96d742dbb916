import copy

import numpy as np
import pytest
import torch

from distill_core.generation_metrics import (
    distinct_n, kendall_tau, sample_metrics, selection_metrics, teacher_nll, teacher_nll_per_prompt, token_f1,
)


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1]], 2) == 0.0


def test_kendall_tau_extremes():
    assert kendall_tau(np.array([3.0, 2, 1]), np.array([0.3, 0.2, 0.1])) == 1.0
    assert kendall_tau(np.array([3.0, 2, 1]), np.array([0.1, 0.2, 0.3])) == -1.0


def test_token_f1():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2], [3, 4]) == 0.0
    assert token_f1([1, 2, 2], [2, 5]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_teacher_nll_matches_a_direct_forward(tiny_teacher):
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    expected = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logp = torch.log_softmax(tiny_teacher(torch.tensor([p + c])).logits[0, :-1], -1)
            expected += [-logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
    assert teacher_nll(tiny_teacher, prompts, completions, pad_id=0) == pytest.approx(np.mean(expected), rel=1e-5)


def test_per_prompt_nll_sums_each_completion_alone_in_any_batch(tiny_teacher):
    prompts, completions = [[5, 6, 7], [8, 9], [3, 4]], [[10, 11], [12, 13, 14], []]
    expected = []
    with torch.no_grad():
        for p, c in zip(prompts[:2], completions[:2]):
            logp = torch.log_softmax(tiny_teacher(torch.tensor([p + c])).logits[0, :-1], -1)
            expected.append(-sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
    for batch_size in (1, 2, 8):
        nll, tokens = teacher_nll_per_prompt(tiny_teacher, prompts, completions, pad_id=0, batch_size=batch_size)
        np.testing.assert_allclose(nll, [*expected, 0.0], rtol=1e-5)
        assert tokens.tolist() == [2, 3, 0]


def test_the_teacher_agrees_with_itself(tiny_teacher):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    sel = selection_metrics(tiny_teacher, {"copy": copy.deepcopy(tiny_teacher)}, prompts, num_beams=3,
                            max_new_tokens=4, length_penalty=1.0, eos_id=None, pad_id=0)["copy"]
    assert sel["selection_agreement"] == 1.0 and sel["kendall_tau"] == pytest.approx(1.0) and sel["beam_token_f1"] == 1.0
    gen = sample_metrics(tiny_teacher, {"copy": copy.deepcopy(tiny_teacher)}, prompts, max_new_tokens=5, eos_id=None, pad_id=0, seed=0)
    assert gen["copy"]["teacher_nll"] == pytest.approx(gen["teacher"]["teacher_nll"], rel=1e-4)
    assert 0 < gen["teacher"]["distinct_1"] <= 1
