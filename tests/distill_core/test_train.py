import copy

import pytest
import torch

from distill_core.batches import Batch, StepBatch
from distill_core.config import LossTerm, TrainConfig
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.train import loss_step, lr_lambda, train

TERMS = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    values = [lr_lambda(s, cfg) for s in range(101)]
    assert values[0] < values[5] < values[10] <= 1.0
    assert values[10] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)


def test_kd_loss_is_zero_when_the_student_is_the_teacher(tiny_teacher):
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = topk_targets_from_logits(tiny_teacher(ids).logits[:, :-1], 8, 1.0)
    batch = StepBatch(data=Batch(ids, torch.ones(2, 15, dtype=torch.bool), targets))
    total, parts = loss_step(tiny_teacher, batch, TERMS, tail="bucket", temperatures={"data": 1.0})
    assert parts["forward_kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert total.item() == pytest.approx(0.5 * parts["ce"].item(), rel=1e-5)


def test_chunked_loss_equals_unchunked(tiny_teacher):
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = topk_targets_from_logits(tiny_teacher(ids).logits[:, :-1] * 0.5, 8, 1.0)
    batch = StepBatch(data=Batch(ids, torch.ones(2, 15, dtype=torch.bool), targets))
    whole, _ = loss_step(tiny_teacher, batch, TERMS, tail="bucket", temperatures={})
    chunked, _ = loss_step(tiny_teacher, batch, TERMS, tail="bucket", temperatures={}, chunk_rows=7)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


def test_stream_is_deterministic_and_skippable(topk_run):
    _, batches = topk_run
    full = [b["data"].input_ids for _, b in zip(range(8), batches(0))]
    resumed = [b["data"].input_ids for _, b in zip(range(5), batches(3))]
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    assert full[0].shape == (4, 24) and next(batches(0))["data"].targets.ids.shape == (4, 23, 4)


def test_compiled_training_follows_eager(topk_run, tiny_teacher):
    storage, batches = topk_run
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu")
    eager = train(copy.deepcopy(tiny_teacher), batches, cfg, TERMS, storage, "students/eager")
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(copy.deepcopy(tiny_teacher), batches, cfg.model_copy(update={"compile": True}), TERMS, storage,
                     "students/compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # the student really ran compiled
    for a, b in zip(compiled.history, eager.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["forward_kl"] == pytest.approx(b["forward_kl"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    saved = load_file(storage.local_path("students/compiled/model/model.safetensors"))
    assert not any(k.startswith("_orig_mod") for k in saved)  # the plain student is saved, not the wrapper


def test_training_lowers_the_loss(topk_run, tiny_teacher):
    storage, batches = topk_run
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=2, device="cpu")
    result = train(copy.deepcopy(tiny_teacher), batches, cfg, TERMS, storage, "students/c")
    first = result.history[0]["loss"]
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < 0.85 * first
