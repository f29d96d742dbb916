import numpy as np
import pyarrow as pa
import pytest
import torch

from distill_core.cache.ref import shards_for
from distill_core.config import TopKConfig
from distill_core.data import read_sequences
from distill_core.errors import CacheError
from distill_core.storage import Storage
from distill_core.teacher.topk import cache_topk, read_targets

TEACHER = {"source": "path:tiny", "fingerprint": "t" * 16, "dtype": "float32"}


def _targets(ref, storage, data, temperature=None):
    """The first shard's targets, top-k ids ascending (the codec gives them by rank)."""
    name = shards_for(ref, storage, data.train)[0]
    seq_ids, out = read_targets(ref.open(storage).read_shard(name), ref.meta, ref.meta["temperature"] if temperature is None else temperature)
    if "topk_ids" in out:
        order = np.argsort(out["topk_ids"], -1)
        out["topk_ids"], out["topk_logprobs"] = (np.take_along_axis(out[k], order, -1) for k in ("topk_ids", "topk_logprobs"))
    return seq_ids, out


def _teacher_logprobs(tiny_teacher, storage, data, tau=1.0):
    _, _, input_ids = next(read_sequences(storage, data.train))
    with torch.no_grad():
        return torch.log_softmax(tiny_teacher(torch.from_numpy(input_ids)).logits[:, :-1] / tau, -1)


def test_topk_shards_hold_the_teachers_top_k(prepared, tiny_teacher):
    storage, data = prepared
    ref = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=5, batch_size=3), storage)
    assert len(shards_for(ref, storage, data.train)) == 3
    seq_ids, out = _targets(ref, storage, data)
    logp = _teacher_logprobs(tiny_teacher, storage, data)
    top = logp.topk(5, -1).indices.sort(-1).values
    assert out["topk_ids"].shape == (8, 23, 5)
    np.testing.assert_array_equal(out["topk_ids"], top.numpy())
    np.testing.assert_allclose(out["topk_logprobs"], logp.gather(-1, top).numpy(), atol=2e-2)  # the codec's bound
    mass = np.exp(out["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(out["tail_logprob"])
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)


def test_a_capture_at_two_temperatures_serves_each_as_a_capture_at_it_would(prepared, tiny_teacher):
    storage, data = prepared
    both = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=5, temperatures=[2.0]), storage)
    at_2 = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=5, temperature=2.0), storage)
    assert both.meta["temperatures"] == [1.0, 2.0] and both.folder != at_2.folder
    _, served = _targets(both, storage, data, 2.0)
    _, captured = _targets(at_2, storage, data)
    np.testing.assert_array_equal(served["topk_ids"], captured["topk_ids"])
    np.testing.assert_allclose(served["topk_logprobs"], captured["topk_logprobs"], atol=2e-2)
    np.testing.assert_allclose(served["tail_logprob"], captured["tail_logprob"], atol=1e-3)
    exact = _teacher_logprobs(tiny_teacher, storage, data, 2.0).gather(-1, torch.from_numpy(served["topk_ids"])).numpy()
    np.testing.assert_allclose(served["topk_logprobs"], exact, atol=2e-2)
    with pytest.raises(CacheError, match=r"serves temperatures \[1.0, 2.0\], not 4.0"):
        _targets(both, storage, data, 4.0)


@pytest.mark.parametrize("strategy", ["sampled", "hybrid"])
def test_draws_are_reproducible_whatever_the_batch_size(prepared, tiny_teacher, tmp_path, strategy):
    storage, data = prepared
    cfg = TopKConfig(strategy=strategy, k=3, draws=16, seed=7, batch_size=3)
    ref = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg, storage)
    other = Storage(str(tmp_path / "other"))
    other.upload_dir(storage.local_path(data.folder), data.folder)
    ref2 = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg.model_copy(update={"batch_size": 8}), other)
    assert [s.sha256 for s in ref.open(storage).shards] == [s.sha256 for s in ref2.open(other).shards]
    reseeded = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg.model_copy(update={"seed": 8}), storage)
    assert reseeded.folder != ref.folder
    _, out = _targets(ref, storage, data)
    assert out["sparse_ids"].shape == (8, 23, cfg.draws + (3 if strategy == "hybrid" else 0))
    np.testing.assert_allclose(out["sparse_mass"].sum(-1), 1.0, atol=2e-2)


def test_a_cache_in_the_float16_codec_still_reads(prepared, tiny_teacher):
    from distill_core.cache.ref import teacher_cache_ref
    from distill_core.cache.shards import list_array
    from distill_core.losses.divergence import topk_targets_from_logits

    storage, data = prepared
    # A cache as written before strategies and codecs: its address and columns.
    ref = teacher_cache_ref("topk", {"k": 4, "temperature": 1.0}, TEACHER, data)
    store = ref.open(storage)
    _, seq_ids, input_ids = next(read_sequences(storage, data.train))
    with torch.no_grad():
        t = topk_targets_from_logits(tiny_teacher(torch.from_numpy(input_ids)).logits[:, :-1], 4, 1.0)
    n = len(seq_ids)
    store.write_shard("part-old.parquet", pa.table({
        "seq_id": pa.array(seq_ids, pa.int64()),
        "ids": list_array(t.ids.reshape(n, -1).numpy().astype(np.uint16), pa.uint16()),
        "logprobs": list_array(t.logprobs.reshape(n, -1).numpy().astype(np.float16), pa.float16()),
        "tail_logprob": list_array(t.tail_logprob.numpy(), pa.float32()),
    }))
    got_seq, out = read_targets(store.read_shard("part-old.parquet"), ref.meta, 1.0)
    np.testing.assert_array_equal(got_seq, seq_ids)
    np.testing.assert_array_equal(out["topk_ids"], t.ids.numpy())
    np.testing.assert_allclose(out["topk_logprobs"], t.logprobs.numpy(), atol=1e-2)
    with pytest.raises(CacheError, match="serves temperature 1.0 only, not 2.0.*topk.temperatures"):
        read_targets(store.read_shard("part-old.parquet"), ref.meta, 2.0)


def test_finished_cache_loads_no_teacher(prepared, tiny_teacher):
    storage, data = prepared
    cfg = TopKConfig(k=4)
    first = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg, storage)

    def no_load():
        raise AssertionError("the teacher was loaded for a finished cache")

    assert cache_topk(no_load, data, TEACHER, cfg, storage) == first


def test_killed_stage_resumes_and_matches_an_uninterrupted_run(prepared, tiny_teacher, tmp_path):
    storage, data = prepared
    cfg = TopKConfig(k=4)

    def die_after_first(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_topk(lambda: tiny_teacher, data, TEACHER, cfg, storage, progress=die_after_first)
    ref = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg, storage)
    reference = Storage(str(tmp_path / "other"))
    reference.upload_dir(storage.local_path(data.folder), data.folder)
    ref2 = cache_topk(lambda: tiny_teacher, data, TEACHER, cfg, reference)
    for a, b in zip(ref.open(storage).shards, ref2.open(reference).shards):
        assert a.sha256 == b.sha256


def test_cache_from_another_teacher_is_refused(prepared, tiny_teacher):
    from distill_core.cache.ref import check_compatible

    storage, data = prepared
    ref = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=4), storage)
    with pytest.raises(CacheError, match="teacher_fingerprint"):
        check_compatible(ref, data, "another-teacher")


def test_teacher_precision_is_part_of_the_address(prepared, tiny_teacher):
    import copy

    storage, data = prepared
    full = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=4), storage)
    half_teacher = copy.deepcopy(tiny_teacher).to(torch.bfloat16)
    half = cache_topk(lambda: half_teacher, data, {**TEACHER, "dtype": "bfloat16"}, TopKConfig(k=4), storage)
    assert half.folder != full.folder
    assert (full.meta["teacher_dtype"], half.meta["teacher_dtype"]) == ("float32", "bfloat16")
    _, full_out = _targets(full, storage, data)
    _, half_out = _targets(half, storage, data)
    np.testing.assert_allclose(half_out["topk_logprobs"].max(-1), full_out["topk_logprobs"].max(-1), atol=0.1)  # bfloat16 keeps ~3 digits


@pytest.mark.parametrize("worker_threads", [0, 1])
@pytest.mark.parametrize("strategy", ["topk", "hybrid"])
def test_the_overlapped_table_equals_sparse_targets_computed_batch_by_batch(prepared, tiny_teacher, strategy, worker_threads, monkeypatch):
    from distill_core.cache import codec
    from distill_core.teacher import topk
    from distill_core.teacher.topk import _topk_table, draw_uniforms, sparse_from_logits

    monkeypatch.setattr(topk, "_worker_threads", lambda device: worker_threads)  # 0: in series, as where the forward has every core
    storage, data = prepared
    cfg = TopKConfig(strategy=strategy, k=4, draws=8, batch_size=3)
    _, seq_ids, input_ids = next(read_sequences(storage, data.train))
    overlapped = _topk_table(tiny_teacher, seq_ids, input_ids, cfg, torch.device("cpu"))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(input_ids), cfg.batch_size):
            batch = torch.from_numpy(input_ids[start : start + cfg.batch_size])
            uniforms = draw_uniforms(cfg.seed, seq_ids[start : start + cfg.batch_size], batch.shape[1] - 1, cfg.draws)
            parts.append(sparse_from_logits(tiny_teacher(input_ids=batch).logits[:, :-1], cfg, uniforms if strategy != "topk" else None))
    serial = codec.encode_table(seq_ids, codec.concat(parts), cfg.served_temperatures())
    assert len(input_ids) > cfg.batch_size and overlapped.equals(serial)


def test_sparse_targets_keep_a_tail_far_below_the_heads_mass_and_none_when_the_head_is_everything():
    from distill_core.teacher.topk import sparse_from_logits

    logits = torch.tensor([[[30.0, 29.0, 0.0, -1.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]]])
    rows = sparse_from_logits(logits, TopKConfig(k=2, temperatures=[0.5]))
    exact = torch.stack([torch.logsumexp(logits[0, :, 2:] / t, -1) - torch.logsumexp(logits[0] / t, -1) for t in (0.5, 1.0)], -1)
    np.testing.assert_allclose(rows.tail, exact.numpy(), rtol=1e-5)  # 1 − Σ head would read e^-29.7 as 0
    np.testing.assert_allclose(rows.lse, torch.stack([torch.logsumexp(logits[0] / t, -1) for t in (0.5, 1.0)], -1).numpy(), rtol=1e-6)
    assert np.isneginf(sparse_from_logits(logits, TopKConfig(k=5)).tail).all()
    with pytest.raises(ValueError, match="pass uniforms"):
        sparse_from_logits(logits, TopKConfig(strategy="sampled", draws=4))
