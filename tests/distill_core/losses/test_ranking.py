import math

import pytest
import torch

from distill_core.losses import listwise_loss, pairwise_margin_loss

INF = float("inf")


def test_listwise_fixed_values():
    teacher = torch.tensor([[math.log(2), 0.0, 0.0], [math.log(2), 0.0, 99.0], [1.0, 2.0, 3.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -INF], [5.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [False, True, False]])
    got = listwise_loss(student, teacher, valid, temperature=1.0)
    # p = [.5, .25, .25] vs uniform: .5·ln 1.5 + .5·ln .75 = .5·ln 1.125
    # p = [2/3, 1/3] vs [1/2, 1/2]: 2/3·ln(4/3) + 1/3·ln(2/3); one valid candidate: 0
    expected = torch.tensor([0.5 * math.log(1.125), 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), 0.0])
    torch.testing.assert_close(got, expected)


def test_listwise_temperature_fixed_value():
    # τ = 2 on teacher [2 ln 2, 0] gives p = [2/3, 1/3]; student [0, 0] gives [1/2, 1/2].
    got = listwise_loss(torch.zeros(1, 2), torch.tensor([[2 * math.log(2), 0.0]]), torch.ones(1, 2, dtype=torch.bool), 2.0)
    torch.testing.assert_close(got, torch.tensor([2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)]))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_listwise_zero_for_equal_and_shifted_scores(temperature):
    teacher = torch.tensor([[-3.0, -1.5, -7.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    for student in (teacher.clone(), teacher + torch.tensor([[5.0], [-2.5]])):
        student[0, 3] = 123.0  # invalid candidates may hold anything
        got = listwise_loss(student, teacher, valid, temperature)
        torch.testing.assert_close(got, torch.zeros(2), atol=1e-6, rtol=0)


def test_pairwise_fixed_values():
    teacher = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    student = torch.tensor([[1.0, 1.5, 0.0], [0.0, 100.0, 0.25], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, False, True], [True, True, True]])
    got = pairwise_margin_loss(student, teacher, valid, margin=1.0)
    # row 0: pairs (0,1): relu(1 + .5) = 1.5, (0,2): relu(1 − 1) = 0, (1,2): relu(1 − 1.5) = 0 → mean .5
    # row 1: only (0,2): relu(1 + .25) = 1.25; row 2: teacher ties, no pairs → 0
    torch.testing.assert_close(got, torch.tensor([0.5, 1.25, 0.0]))


@pytest.mark.parametrize("loss", ["listwise", "pairwise"])
def test_gradient_pushes_best_up_and_skips_invalid(loss):
    teacher = torch.tensor([[0.5, 2.0, -1.0, 0.0], [1.0, 0.0, 3.0, 9.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -INF]], requires_grad=True)
    if loss == "listwise":
        out = listwise_loss(student, teacher, valid, temperature=1.0)
    else:
        out = pairwise_margin_loss(student, teacher, valid, margin=1.0)
    out.sum().backward()
    grad = student.grad
    assert torch.isfinite(grad).all()
    assert grad[0, 1] < 0 and grad[1, 2] < 0  # each prompt's best valid candidate
    assert grad[1, 3] == 0  # invalid, even though its teacher score is the highest
