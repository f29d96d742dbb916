import copy

import pytest
import torch
import torch.nn.functional as F

from distill_core.batches import Batch, BeamBatch, StepBatch
from distill_core.config import LossTerm
from distill_core.errors import ConfigError
from distill_core.losses import DIVERGENCES, masked_mean, sparse_divergence, token_cross_entropy, topk_targets_from_logits
from distill_core.losses.fused import HeadTerm, fused_head_loss, fused_token_ce
from distill_core.train import loss_step

B, T, D, V, K = 3, 7, 6, 40, 5  # 21 rows
TAU, BETA = 1.5, 0.3


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).requires_grad_()
    weight = torch.randn(V, D, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = False
    targets = topk_targets_from_logits(torch.randn(B, T, V, generator=g) * 3, K, TAU)
    return hidden, weight, b, labels, mask, targets


def _grads(total, tensors):
    return torch.autograd.grad(total, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_rows", [4, 7, 21, 64])  # 4 does not divide the 21 rows, 7 does; 64 is one chunk
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_unfused(name, tail, chunk_rows):
    hidden, weight, bias, labels, mask, targets = _inputs()
    logits = F.linear(hidden, weight, bias)
    ce = masked_mean(token_cross_entropy(logits, labels, mask), mask)
    div = masked_mean(sparse_divergence(name, logits, targets, tail=tail, temperature=TAU, beta=BETA), mask)
    expected = 0.4 * ce + 0.6 * div
    rows = mask.float() / mask.sum()
    total, values = fused_head_loss(hidden, weight, bias, labels,
                                    [HeadTerm("ce", 0.4, rows), HeadTerm(name, 0.6, rows, targets, TAU, BETA)],
                                    tail=tail, chunk_rows=chunk_rows)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(values, torch.stack([ce, div]).detach())
    assert not values.requires_grad
    for got, want in zip(_grads(total, (hidden, weight, bias)), _grads(expected, (hidden, weight, bias))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_fused_without_bias_and_scaled_backward():
    hidden, weight, _, labels, mask, targets = _inputs(seed=1, bias=False)
    rows = mask.float() / mask.sum()
    total, _ = fused_head_loss(hidden, weight, None, labels, [HeadTerm("forward_kl", 1.0, rows, targets, TAU)], tail="bucket", chunk_rows=5)
    expected = masked_mean(sparse_divergence("forward_kl", F.linear(hidden, weight), targets, tail="bucket", temperature=TAU), mask)
    for got, want in zip(_grads(3.0 * total, (hidden, weight)), _grads(3.0 * expected, (hidden, weight))):
        torch.testing.assert_close(got, want)


def test_masked_positions_get_no_gradient():
    hidden, weight, bias, labels, mask, targets = _inputs(seed=2)
    rows = mask.float() / mask.sum()
    total, _ = fused_head_loss(hidden, weight, bias, labels, [HeadTerm("ce", 1.0, rows), HeadTerm("jsd", 1.0, rows, targets)],
                               tail="bucket", chunk_rows=4)
    (grad_hidden,) = torch.autograd.grad(total, [hidden])
    assert (grad_hidden[~mask] == 0).all() and (grad_hidden[mask].abs().sum(-1) > 0).all()


def test_all_masked_gives_zero():
    hidden, weight, bias, labels, _, targets = _inputs(seed=3)
    rows = torch.zeros(B, T)
    total, values = fused_head_loss(hidden, weight, bias, labels, [HeadTerm("tvd", 1.0, rows, targets)], tail="bucket", chunk_rows=4)
    assert total.item() == 0.0 and values.tolist() == [0.0]
    assert all((g == 0).all() for g in _grads(total, (hidden, weight, bias)))


def test_fused_values_without_gradients():
    hidden, weight, bias, labels, mask, targets = _inputs(seed=6)
    rows = mask.float() / mask.sum()
    terms = [HeadTerm("ce", 0.5, rows), HeadTerm("skew_kl", 0.5, rows, targets, TAU, BETA)]
    with_grad, values = fused_head_loss(hidden, weight, bias, labels, terms, tail="renormalize", chunk_rows=4)
    with torch.no_grad():
        total, no_grad_values = fused_head_loss(hidden, weight, bias, labels, terms, tail="renormalize", chunk_rows=4)
    assert not total.requires_grad
    torch.testing.assert_close(total, with_grad.detach())
    torch.testing.assert_close(no_grad_values, values)


@pytest.mark.parametrize("chunk_rows", [4, 21])
def test_fused_token_ce_equals_unfused(chunk_rows):
    hidden, weight, bias, labels, mask, _ = _inputs(seed=4)
    got = fused_token_ce(hidden, weight, bias, labels, mask, chunk_rows=chunk_rows)
    want = token_cross_entropy(F.linear(hidden, weight, bias), labels, mask)
    torch.testing.assert_close(got, want)
    scores = torch.randn(B, generator=torch.Generator().manual_seed(5))
    for g, w in zip(_grads((got.sum(-1) * scores).sum(), (hidden, weight, bias)), _grads((want.sum(-1) * scores).sum(), (hidden, weight, bias))):
        torch.testing.assert_close(g, w)


# -- loss_step: loss_chunk_rows against the unfused path -------------------------------------------
def _param_grads(model, total):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(total, params, allow_unused=True)


def _compare_loss_step(model, batch, terms, chunk_rows, **kw):
    whole, whole_parts = loss_step(model, batch, terms, chunk_rows=None, **kw)
    fused, fused_parts = loss_step(model, batch, terms, chunk_rows=chunk_rows, **kw)
    torch.testing.assert_close(fused, whole)
    assert fused_parts.keys() == whole_parts.keys()
    for key in whole_parts:
        torch.testing.assert_close(fused_parts[key], whole_parts[key].detach())
    for got, want in zip(_param_grads(model, fused), _param_grads(model, whole)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_rows", [7, 10])  # 2 × 15 rows: 7 does not divide 30, 10 does
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_loss_step_with_chunk_rows_equals_without(tiny_teacher, tail, chunk_rows):
    student = copy.deepcopy(tiny_teacher)
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = topk_targets_from_logits(tiny_teacher(ids).logits[:, :-1] * 0.5, 8, 2.0)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 9:] = False  # a padded row, as samples batches have
    batch = StepBatch(data=Batch(ids, torch.ones(2, 15, dtype=torch.bool), targets), samples=Batch(ids.flip(0), mask, targets))
    terms = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5), LossTerm(name="jsd", weight=0.2, beta=0.3),
             LossTerm(name="reverse_kl", weight=0.3, on="samples"), LossTerm(name="seqkd", weight=0.1)]
    _compare_loss_step(student, batch, terms, chunk_rows, tail=tail, temperatures={"data": 2.0, "samples": 1.5})


@pytest.mark.parametrize("ranking", ["listwise", "pairwise"])
def test_loss_step_on_beams_with_chunk_rows_equals_without(tiny_teacher, ranking):
    student = copy.deepcopy(tiny_teacher)
    g = torch.Generator().manual_seed(2)
    prompts, n, length = 2, 3, 12
    ids = torch.randint(0, student.config.vocab_size, (prompts * n, length), generator=g)
    mask = torch.zeros(prompts * n, length - 1, dtype=torch.bool)
    mask[:, 4:] = True
    mask[1, 8:] = False
    is_top1 = torch.zeros(prompts * n, dtype=torch.bool)
    is_top1[::n] = True
    beams = BeamBatch(ids, mask, torch.randn(prompts, n, generator=g), torch.ones(prompts, n, dtype=torch.bool), is_top1)
    terms = [LossTerm(name="beam_top1", weight=0.5), LossTerm(name="beam_rank", weight=1.0, ranking=ranking)]
    _compare_loss_step(student, StepBatch(beams=beams), terms, 5, tail="bucket", temperatures={}, length_penalty=1.0)
    _compare_loss_step(student, StepBatch(beams=beams), terms[:1], 5, tail="bucket", temperatures={})
    _compare_loss_step(student, StepBatch(beams=beams), terms[1:], 5, tail="bucket", temperatures={}, length_penalty=1.0)  # ranking alone


def test_loss_step_refuses_a_head_it_cannot_fuse(tiny_teacher):
    student = copy.deepcopy(tiny_teacher)
    student.config.final_logit_softcapping = 30.0
    ids = torch.randint(0, student.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    batch = StepBatch(data=Batch(ids, torch.ones(1, 7, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="final_logit_softcapping.*loss_chunk_rows to null"):
        loss_step(student, batch, [LossTerm(name="ce")], tail="bucket", temperatures={}, chunk_rows=4)


# -- sampled and hybrid targets (topk.strategy) on the fused path -----------------------------------
def _drawn_targets(strategy: str, seed=7, temperature=TAU):
    """Sampled or hybrid targets over the B × T positions, through the codec as training reads them."""
    import numpy as np

    from distill_core.cache import codec
    from distill_core.config import TopKConfig
    from distill_core.losses.signals import SampledTargets
    from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

    cfg = TopKConfig(strategy=strategy, k=K, draws=12, temperature=1.0, temperatures=[temperature], seed=seed)
    teacher = torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 3
    rows = sparse_from_logits(teacher, cfg, draw_uniforms(cfg.seed, np.arange(B), T, cfg.draws))
    table = codec.encode_table(np.arange(B), rows, cfg.served_temperatures())
    meta = {"strategy": strategy, "k": rows.head, "temperature": 1.0, "temperatures": cfg.served_temperatures(),
            "codec": codec.CODEC, "draws": cfg.draws}
    _, out = read_targets(table, meta, temperature)
    t = lambda key: torch.from_numpy(out[key])  # noqa: E731
    return SampledTargets(t("sparse_ids"), t("sparse_logprobs"), t("sparse_mass"), t("tail_logprob"), head=rows.head)


DRAWN_CASES = [("sampled", n) for n in ("forward_kl", "skew_kl")] + [("hybrid", n) for n in sorted(DIVERGENCES)]


@pytest.mark.parametrize("chunk_rows", [4, 7, 21, 64])
@pytest.mark.parametrize("strategy, name", DRAWN_CASES)
def test_fused_equals_unfused_on_drawn_targets(strategy, name, chunk_rows):
    from distill_core.losses.sampled import teacher_divergence

    hidden, weight, bias, labels, mask, _ = _inputs(seed=8)
    targets = _drawn_targets(strategy)
    assert targets.head == (0 if strategy == "sampled" else K) and (targets.mass == 0).any()  # padded ids are in play
    logits = F.linear(hidden, weight, bias)
    ce = masked_mean(token_cross_entropy(logits, labels, mask), mask)
    div = masked_mean(teacher_divergence(name, logits, targets, tail="bucket", temperature=TAU, beta=BETA), mask)
    expected = 0.3 * ce + 0.7 * div
    rows = mask.float() / mask.sum()
    total, values = fused_head_loss(hidden, weight, bias, labels,
                                    [HeadTerm("ce", 0.3, rows), HeadTerm(name, 0.7, rows, targets, TAU, BETA)],
                                    tail="bucket", chunk_rows=chunk_rows)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(values, torch.stack([ce, div]).detach())
    assert div.item() != 0.0
    for got, want in zip(_grads(total, (hidden, weight, bias)), _grads(expected, (hidden, weight, bias))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("strategy", ["sampled", "hybrid"])
def test_loss_step_with_chunk_rows_equals_without_on_drawn_targets(tiny_teacher, strategy):
    import numpy as np

    from distill_core.cache import codec
    from distill_core.config import TopKConfig
    from distill_core.losses.signals import SampledTargets
    from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

    student = copy.deepcopy(tiny_teacher)
    for p in student.transformer.h[0].parameters():  # a student that differs from its teacher
        p.data.mul_(0.5)
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    cfg = TopKConfig(strategy=strategy, k=6, draws=10, temperature=1.0, temperatures=[2.0])
    with torch.no_grad():
        rows = sparse_from_logits(tiny_teacher(ids).logits[:, :-1], cfg, draw_uniforms(0, np.arange(2), 15, cfg.draws))
    meta = {"strategy": strategy, "k": rows.head, "temperature": 1.0, "temperatures": cfg.served_temperatures(),
            "codec": codec.CODEC, "draws": cfg.draws}
    _, out = read_targets(codec.encode_table(np.arange(2), rows, cfg.served_temperatures()), meta, 2.0)
    t = lambda key: torch.from_numpy(out[key])  # noqa: E731
    targets = SampledTargets(t("sparse_ids"), t("sparse_logprobs"), t("sparse_mass"), t("tail_logprob"), head=rows.head)
    batch = StepBatch(data=Batch(ids, torch.ones(2, 15, dtype=torch.bool), targets))
    names = ["forward_kl", "skew_kl"] + (["reverse_kl", "jsd"] if strategy == "hybrid" else [])
    terms = [LossTerm(name="ce", weight=0.5)] + [LossTerm(name=n, weight=0.25, beta=0.3) for n in names]
    _compare_loss_step(student, batch, terms, 7, tail="bucket", temperatures={"data": 2.0})
