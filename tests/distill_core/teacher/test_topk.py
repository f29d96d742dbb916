import numpy as np
import pyarrow as pa
import pytest
import torch

from distill_core.cache.ref import shards_for
from distill_core.config import TopKConfig
from distill_core.data import read_sequences
from distill_core.errors import CacheError
from distill_core.storage import Storage
from distill_core.teacher.topk import cache_topk, read_topk_table

TEACHER = {"source": "path:tiny", "fingerprint": "t" * 16, "dtype": "float32"}


def test_topk_shards_hold_the_teachers_top_k(prepared, tiny_teacher):
    storage, data = prepared
    ref = cache_topk(lambda: tiny_teacher, data, TEACHER, TopKConfig(k=5, batch_size=3), storage)
    names = shards_for(ref, storage, data.train)
    assert len(names) == 3
    table = ref.open(storage).read_shard(names[0])
    assert table.schema.field("ids").type == pa.list_(pa.uint16())
    assert table.schema.field("logprobs").type == pa.list_(pa.float16())
    seq_ids, ids, lps, tail = read_topk_table(table, 5)
    _, _, input_ids = next(read_sequences(storage, data.train))
    with torch.no_grad():
        logp = torch.log_softmax(tiny_teacher(torch.from_numpy(input_ids)).logits[:, :-1], -1)
    top = logp.topk(5, -1)
    assert ids.shape == (8, 23, 5)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(lps, top.values.numpy(), atol=2e-2, rtol=1e-3)  # float16 storage
    mass = np.exp(lps.astype(np.float64)).sum(-1) + np.exp(tail)
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)


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
    name = shards_for(full, storage, data.train)[0]
    _, _, full_lps, _ = read_topk_table(full.open(storage).read_shard(name), 4)
    _, _, half_lps, _ = read_topk_table(half.open(storage).read_shard(name), 4)
    np.testing.assert_allclose(half_lps[..., 0], full_lps[..., 0], atol=0.1)  # bfloat16 keeps ~3 digits
