import copy
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distill_core.batches import Batch, StepBatch, step_batches, topk_stream
from distill_core.config import DataConfig, LossTerm, PathTeacher, StudentConfig, TopKConfig, TrainConfig
from distill_core.data import prepare_data
from distill_core.errors import TeacherError
from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.storage import Storage
from distill_core.teacher import load as teacher_load
from distill_core.teacher.load import load_tokenizer, resolve_teacher
from distill_core.teacher.topk import cache_topk
from distill_core.train import loss_step, lr_lambda, train, train_student

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


@pytest.mark.parametrize("chunk_rows", [None, 40], ids=["logits", "fused"])  # fused: the compiled student runs its body only
def test_compiled_training_follows_eager(topk_run, tiny_teacher, chunk_rows):
    storage, batches = topk_run
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu", loss_chunk_rows=chunk_rows)
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


# -- stage entry point: pretrained students ----------------------------------------------------------
def _pretrained(folder, tokenizer) -> str:
    """A 1-layer GPT-2 over 384 ids saved with ``tokenizer``; returns its folder."""
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _train_pretrained(storage: Storage, teacher_dir, pretrained: str):
    ref = resolve_teacher(PathTeacher(path=str(teacher_dir)), storage)
    tokenizer = load_tokenizer(ref, storage)
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=8), tokenizer, ref.tokenizer_hash, storage)
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=0, device="cpu", baseline=False)
    return ref, train_student("student", [LossTerm(name="ce")], StudentConfig(init="pretrained", pretrained=pretrained), cfg, storage, ref, data)


def test_a_pretrained_student_with_another_tokenizer_is_refused(tmp_path, tiny_teacher_dir, other_tokenizer):
    """Same vocabulary size, other tokenizer: the registered folder would pair the teacher's tokenizer
    with weights trained on another."""
    storage = Storage(str(tmp_path / "root"))
    other = _pretrained(tmp_path / "other", other_tokenizer)
    with pytest.raises(TeacherError, match=f"student {other} has the teacher's vocabulary size but another tokenizer"):
        _train_pretrained(storage, tiny_teacher_dir, other)
    assert not storage.exists("students")


def test_a_pretrained_student_on_s3_trains_without_loading_the_teacher(tmp_path, s3_storage, tiny_teacher_dir, tiny_tokenizer, monkeypatch):
    s3_storage.upload_dir(_pretrained(tmp_path / "student", tiny_tokenizer), "pretrained")

    def no_teacher(*args, **kwargs):
        raise AssertionError("a pretrained student needs the teacher's tokenizer, not its weights")

    monkeypatch.setattr(teacher_load, "load_teacher", no_teacher)
    ref, result = _train_pretrained(s3_storage, tiny_teacher_dir, s3_storage.url("pretrained"))
    assert result.steps == 1 and math.isfinite(result.final_loss)
    saved = json.loads(s3_storage.read_bytes(f"{result.model_folder}/config.json"))
    assert (saved["n_layer"], saved["vocab_size"]) == (1, 384)
    assert s3_storage.exists(f"{result.model_folder}/tokenizer.json")


# -- sampled and hybrid top-k caches ---------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["sampled", "hybrid"])
def test_training_on_drawn_targets_at_a_served_temperature_lowers_the_loss(tmp_path, tiny_tokenizer, tiny_teacher, strategy):
    from distill_core.losses.signals import SampledTargets

    storage = Storage(str(tmp_path / "root"))
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=24), tiny_tokenizer, "tok", storage)
    topk = TopKConfig(strategy=strategy, k=3, draws=8, temperatures=[2.0])
    cache = cache_topk(lambda: tiny_teacher, data, {"source": "t", "fingerprint": "f", "dtype": "float32"}, topk, storage)
    batches = step_batches({"data": topk_stream(storage, data, cache, seed=0, temperature=2.0)}, batch_size=4, pad_id=0)
    first = next(batches(0))["data"]
    assert isinstance(first.targets, SampledTargets) and first.targets.head == (3 if strategy == "hybrid" else 0)
    assert first.shard(1, 2).targets.ids.shape[0] == 2
    cfg = TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=2, device="cpu")
    terms = [LossTerm(name="forward_kl")]
    from distill_core.student import build_student

    student = build_student(tiny_teacher, StudentConfig(init="config", num_layers=1), seed=0)
    result = train(student, batches, cfg, terms, storage, "students/drawn", temperatures={"data": 2.0})
    losses = [h["forward_kl"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:3]) / 3


def test_a_temperature_the_cache_does_not_serve_is_refused():
    from distill_core.cache.ref import CacheRef
    from distill_core.errors import CacheError
    from distill_core.train import _topk_temperature

    cache = CacheRef("topk", "caches/topk/x", "x", {"temperature": 1.0, "temperatures": [1.0, 2.0]})
    assert _topk_temperature(cache, TrainConfig()) == 1.0
    assert _topk_temperature(cache, TrainConfig(temperature=2.0)) == 2.0
    with pytest.raises(CacheError, match=r"serves \[1.0, 2.0\]"):
        _topk_temperature(cache, TrainConfig(temperature=4.0))
    old = CacheRef("topk", "caches/topk/y", "y", {"temperature": 1.0})  # a cache from before topk.temperatures
    with pytest.raises(CacheError, match=r"serves \[1.0\]"):
        _topk_temperature(old, TrainConfig(temperature=2.0))


def test_a_student_with_its_own_tokenizer_trains_on_the_same_text_and_is_scored_per_byte(tmp_path, tiny_teacher_dir, small_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_core.config import EvalConfig, TopKConfig
    from distill_core.evaluate import evaluate_students
    from distill_core.teacher.topk import cache_topk

    storage = Storage(str(tmp_path / "root"))
    small_tokenizer.save_pretrained(tmp_path / "small")
    ref = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)
    teacher, tokenizer = teacher_load.load_teacher(ref, storage)
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=16, max_validation_sequences=4),
                        tokenizer, ref.tokenizer_hash, storage)
    cache = cache_topk(lambda: teacher, data, ref.to_dict(), TopKConfig(k=8), storage)
    cfg = TrainConfig(steps=3, batch_size=2, warmup_steps=0, device="cpu", baseline=False)
    student_cfg = StudentConfig(init="teacher_layers", layers=[0, 3], tokenizer=str(tmp_path / "small"))
    terms = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="uld", weight=0.5), LossTerm(name="ce", weight=0.5)]
    result = train_student("student", terms, student_cfg, cfg, storage, ref, data, caches={"topk": cache})
    assert all(math.isfinite(h[k]) for h in result.history for k in ("loss", "forward_kl", "uld", "ce"))
    assert 0 < result.history[0]["uld"] <= 2
    folder = storage.local_dir(result.model_folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    saved = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(saved) == 300
    ids = saved("def f(x):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=saved.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 4) and isinstance(saved.decode(out[0]), str)

    metrics = evaluate_students(ref, {"student": result.model_folder}, storage, data, EvalConfig(max_sequences=4, batch_size=2), "cpu",
                                baseline=None)
    t, s = metrics["teacher"], metrics["student"]
    assert t["unit"] == s["unit"] == "byte" and s["top1_agreement"] is None
    assert 0 < t["val_bpb"] < 16 and 0 < s["val_bpb"] < 16 and s["val_bpb_low"] <= s["val_bpb"] <= s["val_bpb_high"]
    assert s["per_sequence"]["tokens"] == t["per_sequence"]["tokens"]
    assert s["ppl_ratio_vs_teacher_low"] <= s["ppl_ratio_vs_teacher"] <= s["ppl_ratio_vs_teacher_high"]
