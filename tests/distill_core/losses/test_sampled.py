import numpy as np
import pytest
import torch

from distill_core.cache import codec
from distill_core.config import TopKConfig
from distill_core.losses.divergence import dense_divergence, sparse_divergence, topk_targets_from_logits
from distill_core.losses.sampled import sampled_divergence, teacher_divergence
from distill_core.losses.signals import SampledTargets
from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

VOCAB = 40
CACHES = 3000  # independent sampled caches of one position each


def _fixed(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(VOCAB, generator=gen) * 2.5
    student = torch.randn(VOCAB, generator=gen)
    return teacher, student


def _sampled_targets(teacher: torch.Tensor, cfg: TopKConfig, tau: float) -> SampledTargets:
    """CACHES independent caches of the same teacher position, through the codec, at temperature tau."""
    logits = teacher.expand(1, CACHES, VOCAB)
    rows = sparse_from_logits(logits, cfg, draw_uniforms(cfg.seed, np.array([0]), CACHES, cfg.draws))
    table = codec.encode_table(np.array([0]), rows, cfg.served_temperatures())
    meta = {"strategy": cfg.strategy, "k": rows.head, "temperature": cfg.temperature, "temperatures": cfg.served_temperatures(),
            "codec": codec.CODEC, "draws": cfg.draws}
    _, out = read_targets(table, meta, tau)
    t = lambda key: torch.from_numpy(out[key])  # noqa: E731
    return SampledTargets(t("sparse_ids"), t("sparse_logprobs"), t("sparse_mass"), t("tail_logprob"), head=rows.head)


def _grads(per_token_fn, student: torch.Tensor) -> torch.Tensor:
    """Gradient of each position's loss in the (shared) student logits: [CACHES, V]."""
    logits = student.expand(1, CACHES, VOCAB).clone().requires_grad_(True)
    per_token_fn(logits).sum().backward()
    return logits.grad[0]


def _dense_grad(teacher, student, tau, name="forward_kl") -> torch.Tensor:
    logits = student.view(1, 1, VOCAB).clone().requires_grad_(True)
    dense_divergence(name, logits, teacher.view(1, 1, VOCAB), temperature=tau).sum().backward()
    return logits.grad.view(-1)


@pytest.mark.parametrize(
    "strategy, capture, tau, name",
    [("sampled", 1.0, 1.0, "forward_kl"), ("hybrid", 1.0, 1.0, "forward_kl"), ("sampled", 1.0, 2.0, "forward_kl"),
     ("sampled", 1.0, 1.0, "skew_kl")],
)
def test_sampled_forward_kl_gradient_is_unbiased_and_top_k_is_not(strategy, capture, tau, name):
    teacher, student = _fixed()
    cfg = TopKConfig(strategy=strategy, k=4, draws=8, temperature=capture, temperatures=[tau])
    targets = _sampled_targets(teacher, cfg, tau)
    grads = _grads(lambda x: sampled_divergence(name, x, targets, temperature=tau), student)
    dense = _dense_grad(teacher, student, tau, name)
    mean, se = grads.mean(0), grads.std(0) / CACHES**0.5
    # within 4.5 standard errors (plus the codec's rounding) on every logit
    assert ((mean - dense).abs() <= 4.5 * se + 2e-3).all(), (mean - dense).abs().max()
    # the top-k estimate with the same kept ids per position is biased far beyond that
    top = topk_targets_from_logits(teacher.expand(1, 1, VOCAB), 4, tau)
    logits = student.view(1, 1, VOCAB).clone().requires_grad_(True)
    sparse_divergence(name, logits, top, tail="renormalize", temperature=tau).sum().backward()
    bias = (logits.grad.view(-1) - dense).abs()
    assert bias.max() > 10 * (4.5 * se + 2e-3).max()


def test_sampled_forward_kl_value_is_unbiased():
    teacher, student = _fixed(1)
    targets = _sampled_targets(teacher, TopKConfig(strategy="sampled", draws=12), 1.0)
    estimates = sampled_divergence("forward_kl", student.expand(1, CACHES, VOCAB), targets, temperature=1.0)[0]
    dense = dense_divergence("forward_kl", student.view(1, 1, VOCAB), teacher.view(1, 1, VOCAB), temperature=1.0).item()
    assert abs(estimates.mean().item() - dense) <= 4.5 * estimates.std().item() / CACHES**0.5 + 1e-3


def test_sampled_estimate_at_k_equals_vocab_is_the_dense_divergence():
    teacher, student = _fixed(2)
    targets = _sampled_targets(teacher, TopKConfig(strategy="hybrid", k=VOCAB, draws=4), 1.0)
    got = sampled_divergence("forward_kl", student.expand(1, CACHES, VOCAB)[:, :3], _first(targets, 3), temperature=1.0)
    dense = dense_divergence("forward_kl", student.view(1, 1, VOCAB), teacher.view(1, 1, VOCAB), temperature=1.0)
    torch.testing.assert_close(got, dense.expand(1, 3), atol=5e-3, rtol=0)


def _first(t: SampledTargets, n: int) -> SampledTargets:
    return SampledTargets(t.ids[:, :n], t.logprobs[:, :n], t.mass[:, :n], t.tail_logprob[:, :n], t.head)


def test_hybrid_reverse_kl_is_the_head_plus_tail_bucket():
    teacher, student = _fixed(3)
    targets = _first(_sampled_targets(teacher, TopKConfig(strategy="hybrid", k=6, draws=8), 1.0), 5)
    logits = student.expand(1, 5, VOCAB)
    got = teacher_divergence("reverse_kl", logits, targets, tail="bucket", temperature=1.0)
    expected = sparse_divergence("reverse_kl", logits, targets.head_targets(), tail="bucket", temperature=1.0)
    torch.testing.assert_close(got, expected)


def test_chunked_estimate_equals_unchunked():
    teacher, student = _fixed(4)
    targets = _first(_sampled_targets(teacher, TopKConfig(strategy="sampled", draws=8), 1.0), 7)
    logits = (student.expand(1, 7, VOCAB) + torch.randn(1, 7, VOCAB)).requires_grad_(True)
    whole = sampled_divergence("forward_kl", logits, targets, temperature=1.0)
    chunked = sampled_divergence("forward_kl", logits, targets, temperature=1.0, chunk_rows=3)
    torch.testing.assert_close(chunked, whole)
