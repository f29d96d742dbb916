import dataclasses

import numpy as np
import pytest
import torch

from distill_core.batches import collate_beams, collate_samples
from distill_core.teacher.beams_cache import read_beams_table
from distill_core.teacher.samples_cache import read_samples_table
from distill_core.cache.ref import shards_for
from distill_core.cache.stage import run_all
from distill_core.config import BeamsConfig, DataConfig, SamplesConfig
from distill_core.data import prepare_data
from distill_core.errors import CacheError
from distill_core.storage import Storage
from distill_core.teacher.beams_cache import beams_job
from distill_core.teacher.samples_cache import samples_job

TEACHER = {"source": "path:tiny", "fingerprint": "t" * 16, "eos_token_id": 0, "dtype": "float32"}


@pytest.fixture
def prepared(tmp_path, tiny_tokenizer):
    storage = Storage(str(tmp_path / "root"))
    cfg = DataConfig(seq_len=24, rows_per_shard=4, max_documents=12, max_train_sequences=12, max_validation_sequences=4)
    return storage, prepare_data(cfg, tiny_tokenizer, "tok", storage)


def test_samples_cache_is_reproducible_and_covers_the_planned_prompts(prepared, tiny_teacher, tmp_path):
    storage, data = prepared
    cfg = SamplesConfig(prompt_len=8, num_prompts=6, num_samples=2, max_new_tokens=5, soft_topk=4, batch_size=4)
    job = samples_job(cfg, TEACHER, data)
    ref = run_all(job, lambda: tiny_teacher, data, storage)
    names = shards_for(ref, storage, data.train, rows=6)
    assert len(names) == 2  # 4 prompts from the first data shard, 2 from the second
    tables = [ref.open(storage).read_shard(n) for n in names]
    assert [t.num_rows for t in tables] == [8, 4]
    rows = read_samples_table(tables[0], 4)
    assert len(rows["prompt_ids"][0]) == 8 and 1 <= len(rows["completion_ids"][0]) <= 5
    assert rows["topk_ids"][0].shape == (len(rows["completion_ids"][0]), 4)
    other = Storage(str(tmp_path / "other"))
    other.upload_dir(storage.local_path(data.folder), data.folder)
    ref2 = run_all(job, lambda: tiny_teacher, data, other)
    assert [s.sha256 for s in ref.open(storage).shards] == [s.sha256 for s in ref2.open(other).shards]


def test_samples_batch_masks_prompt_tokens(prepared, tiny_teacher):
    storage, data = prepared
    cfg = SamplesConfig(prompt_len=8, num_prompts=4, num_samples=1, max_new_tokens=5, soft_topk=3)
    ref = run_all(samples_job(cfg, TEACHER, data), lambda: tiny_teacher, data, storage)
    rows = read_samples_table(ref.open(storage).read_shard(shards_for(ref, storage, data.train, 4)[0]), 3)
    batch = collate_samples([{k: v[i] for k, v in rows.items()} for i in range(2)], pad_id=0)
    for i in range(2):
        c = len(rows["completion_ids"][i])
        expected = torch.zeros(batch.loss_mask.shape[1], dtype=torch.bool)
        expected[7 : 7 + c] = True  # position t predicts token t+1: the first completion token is at 8
        assert torch.equal(batch.loss_mask[i], expected)
        assert torch.equal(batch.input_ids[i, 8 : 8 + c], torch.as_tensor(rows["completion_ids"][i].astype(np.int64)))
        assert torch.equal(batch.targets.ids[i, 7 : 7 + c], torch.as_tensor(rows["topk_ids"][i]))


def test_beams_cache_keeps_every_candidate_best_first(prepared, tiny_teacher):
    storage, data = prepared
    cfg = BeamsConfig(prompt_len=8, num_prompts=4, num_beams=3, max_new_tokens=4)
    ref = run_all(beams_job(cfg, TEACHER, data), lambda: tiny_teacher, data, storage)
    table = ref.open(storage).read_shard(shards_for(ref, storage, data.train, 4)[0])
    assert table.num_rows == 12
    assert table["rank"].to_pylist()[:3] == [0, 1, 2]
    scores = table["score"].to_numpy().reshape(4, 3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    n = table["n_tokens"].to_numpy()
    np.testing.assert_allclose(table["score"].to_numpy(), table["sum_logprob"].to_numpy() / n, rtol=1e-5)
    grouped = read_beams_table(table, 3)
    batch = collate_beams([{k: v[i] for k, v in grouped.items()} for i in range(2)], pad_id=0)
    assert batch.input_ids.shape[0] == 6 and batch.teacher_scores.shape == (2, 3)
    assert batch.is_top1.tolist() == [True, False, False, True, False, False]


def test_prompt_longer_than_sequences_is_refused(prepared):
    _, data = prepared
    from distill_core.errors import ConfigError

    with pytest.raises(ConfigError, match="prompt_len"):
        samples_job(SamplesConfig(prompt_len=24), TEACHER, data)


def test_missing_samples_shards_are_named(prepared):
    storage, data = prepared
    ref = samples_job(SamplesConfig(prompt_len=8, num_prompts=4), TEACHER, data).ref
    with pytest.raises(CacheError, match="run the cache_samples stage"):
        shards_for(ref, storage, data.train, rows=4)


def test_a_cache_from_other_settings_or_teacher_is_refused_naming_the_difference(prepared, tiny_teacher):
    from distill_core.cache.ref import CacheRef, check_compatible

    storage, data = prepared
    ref = run_all(samples_job(SamplesConfig(prompt_len=8, num_prompts=4, max_new_tokens=3), TEACHER, data),
                  lambda: tiny_teacher, data, storage)
    hotter = CacheRef(ref.kind, ref.folder, ref.fingerprint, {**ref.meta, "temperature": 0.7})
    with pytest.raises(CacheError, match=r"meta\.temperature is 1\.0 there, 0\.7 here"):
        hotter.open(storage)
    with pytest.raises(CacheError, match="teacher_fingerprint"):
        check_compatible(ref, data, "another-teacher")
    beams = run_all(beams_job(BeamsConfig(prompt_len=8, num_prompts=4, num_beams=2, max_new_tokens=3), TEACHER, data),
                    lambda: tiny_teacher, data, storage)
    wider = CacheRef(beams.kind, beams.folder, beams.fingerprint, {**beams.meta, "num_beams": 4})
    with pytest.raises(CacheError, match=r"meta\.num_beams is 2 there, 4 here"):
        wider.open(storage)


@pytest.mark.parametrize("kind", ["samples", "beams"])
def test_decode_kind_changes_neither_the_address_nor_the_rows(kind, prepared, tiny_teacher, tmp_path):
    storage, data = prepared
    if kind == "samples":
        base = dict(prompt_len=8, num_prompts=6, num_samples=2, max_new_tokens=5, batch_size=4)
        job = lambda decode: samples_job(SamplesConfig(**base, decode=decode), TEACHER, data)  # noqa: E731
        value = "token_logprobs"
    else:
        base = dict(prompt_len=8, num_prompts=6, num_beams=3, max_new_tokens=4, batch_size=4)
        job = lambda decode: beams_job(BeamsConfig(**base, decode=decode), TEACHER, data)  # noqa: E731
        value = "score"
    dynamic = run_all(job("dynamic"), lambda: tiny_teacher, data, storage)
    other = Storage(str(tmp_path / "other"))
    other.upload_dir(storage.local_path(data.folder), data.folder)
    static = run_all(job("static"), lambda: tiny_teacher, data, other)
    assert static.folder == dynamic.folder
    for name in shards_for(dynamic, storage, data.train, rows=6):
        a, b = dynamic.open(storage).read_shard(name), static.open(other).read_shard(name)
        assert a["completion_ids"].to_pylist() == b["completion_ids"].to_pylist()
        values = [np.hstack(t[value].to_pylist()) for t in (a, b)]  # per-token logprobs or per-candidate scores
        np.testing.assert_allclose(values[0], values[1], atol=1e-5)


@pytest.mark.parametrize("kind", ["samples", "beams"])
def test_killed_generation_resumes_at_the_first_unfinished_shard(kind, prepared, tiny_teacher, tmp_path):
    storage, data = prepared
    if kind == "samples":
        job = samples_job(SamplesConfig(prompt_len=8, num_prompts=12, num_samples=2, max_new_tokens=5, batch_size=4), TEACHER, data)
    else:
        job = beams_job(BeamsConfig(prompt_len=8, num_prompts=12, num_beams=2, max_new_tokens=4), TEACHER, data)
    computed = []

    def compute_then_die(model, seq_ids, input_ids, data_sha):
        if computed:  # the second shard: killed before it is written
            raise KeyboardInterrupt
        computed.append(data_sha)
        return job.compute(model, seq_ids, input_ids, data_sha)

    with pytest.raises(KeyboardInterrupt):
        run_all(dataclasses.replace(job, compute=compute_then_die), lambda: tiny_teacher, data, storage)
    assert len(job.ref.open(storage).recorded()) == 1  # the first shard survived, uncommitted

    resumed = []

    def compute_counted(model, seq_ids, input_ids, data_sha):
        resumed.append(data_sha)
        return job.compute(model, seq_ids, input_ids, data_sha)

    ref = run_all(dataclasses.replace(job, compute=compute_counted), lambda: tiny_teacher, data, storage)
    assert len(resumed) == 2 and computed[0] not in resumed  # only the two unfinished shards, in data order

    other = Storage(str(tmp_path / "uninterrupted"))
    other.upload_dir(storage.local_path(data.folder), data.folder)
    reference = run_all(job, lambda: tiny_teacher, data, other)
    assert [s.sha256 for s in ref.open(storage).shards] == [s.sha256 for s in reference.open(other).shards]
