import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import distill_core.data as data_module
from distill_core.config import DataConfig
from distill_core.data import (
    assign_validation, data_fingerprint, load_data_ref, pack, prepare_data, read_sequences, split_keys,
)
from distill_core.documents import document_stream, embedded_documents
from distill_core.errors import DataError
from distill_core.storage import Storage


def _digests(docs):
    return np.array([list(hashlib.sha256(d.encode()).digest()[:16]) for d in docs], dtype=np.uint8)


def _split(docs, sizes, fraction, seed=0):
    is_val = assign_validation(split_keys(_digests(docs), seed), np.asarray(sizes, dtype=np.int64), fraction)
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def _rows(storage, folder):
    return np.concatenate([ids for _, _, ids in read_sequences(storage, folder)])


# -- packing ---------------------------------------------------------------------------------------
def test_pack_concatenates_and_drops_remainder():
    rows = np.concatenate(list(pack(iter([[1, 2, 0], [3, 4, 5, 0]]), 3, rows_per_chunk=1)))
    assert rows.tolist() == [[1, 2, 0], [3, 4, 5]]


def test_pack_in_chunks_equals_packing_everything_at_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, n) for n in [5, 1, 300, 7, 0, 64, 1000, 3]]  # a huge one among small ones
    flat = np.concatenate(docs)
    whole = flat[: len(flat) // 8 * 8].reshape(-1, 8)
    chunks = list(pack(iter(docs), 8, rows_per_chunk=5))
    assert [len(c) for c in chunks[:-1]] == [5] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 5
    assert np.array_equal(np.concatenate(chunks), whole)


# -- the split -------------------------------------------------------------------------------------
def test_split_is_by_document_and_mostly_stable_under_growth():
    docs = [f"document {i}" for i in range(200)]
    train, val = _split(docs, [10] * 200, 0.2)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200
    assert len(val) == 40  # equal sizes: exactly the share of documents
    train2, val2 = _split(docs + ["new doc"], [10] * 201, 0.2)
    assert len(set(val) & set(val2)) >= 38 and len(set(train) & set(train2)) >= 158


def test_split_keeps_the_token_share_near_the_fraction_despite_a_huge_document():
    # The reported case: one document holding most tokens put 0.04% or 99% of tokens in validation.
    docs = [f"doc {i}" for i in range(100)]
    sizes = np.full(100, 100)
    sizes[37] = 50_000
    for seed in range(5):
        is_val = assign_validation(split_keys(_digests(docs), seed), sizes, 0.2)
        share = sizes[is_val].sum() / sizes.sum()
        assert not is_val[37]  # the huge document can only be in training
        assert share == pytest.approx(sizes[~(np.arange(100) == 37)].sum() / sizes.sum())  # all others: best possible
    sizes = np.random.default_rng(1).integers(10, 2_000, 300)
    sizes[5] = 80_000
    docs = [f"doc {i}" for i in range(300)]
    for seed in range(5):
        is_val = assign_validation(split_keys(_digests(docs), seed), sizes, 0.2)
        assert abs(sizes[is_val].sum() / sizes.sum() - 0.2) < 0.005


def test_identical_documents_are_never_on_both_sides():
    docs = ["same text"] * 30 + [f"doc {i}" for i in range(30)]
    train, val = _split(docs, [5] * 60, 0.3)
    assert not ({"same text"} & set(train) and {"same text"} & set(val))


def test_split_depends_on_the_seed_only():
    docs = [f"doc {i}" for i in range(100)]
    assert _split(docs, [3] * 100, 0.2, seed=1) == _split(docs, [3] * 100, 0.2, seed=1)
    assert _split(docs, [3] * 100, 0.2, seed=1) != _split(docs, [3] * 100, 0.2, seed=2)


def test_a_split_far_from_the_fraction_is_logged_with_the_shares(tmp_path, tiny_tokenizer, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "huge.txt").write_text("the same words again and again. " * 3000)
    for i in range(4):
        (folder / f"small{i}.txt").write_text(f"a small document number {i}. " * 20)
    cfg = DataConfig(source=str(folder), seq_len=8, validation_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="distill_core.data"):
        prepare_data(cfg, tiny_tokenizer, "h", Storage(str(tmp_path / "root")))
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "validation holds" in record.getMessage() and "asks for 20.00%" in record.getMessage()


# -- sources ---------------------------------------------------------------------------------------
def test_embedded_corpus_is_real_text():
    docs = embedded_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


def _text_folder(tmp_path, files=18, lines=40):
    folder = tmp_path / "texts"
    folder.mkdir()
    texts = []
    for i in range(files):
        text = "".join(f"file{i:02d} line {j}: x = {i * j}\n" for j in range(lines))
        (folder / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    return folder, texts


def test_a_text_file_is_one_document_with_its_newlines(tmp_path):
    folder, texts = _text_folder(tmp_path)
    assert list(document_stream(DataConfig(source=str(folder)))()) == texts
    cfg = DataConfig(source="text", data_files=[str(folder / "doc00.txt"), str(folder / "doc01.txt")])
    assert list(document_stream(cfg)()) == texts[:2]


def test_a_text_file_lands_on_one_side_of_the_split(tmp_path, tiny_tokenizer):
    folder, texts = _text_folder(tmp_path)
    storage = Storage(str(tmp_path / "root"))
    ref = prepare_data(DataConfig(source=str(folder), seq_len=8, validation_fraction=0.2), tiny_tokenizer, "h", storage)
    train = tiny_tokenizer.decode(_rows(storage, ref.train).ravel())
    val = tiny_tokenizer.decode(_rows(storage, ref.validation).ravel())
    assert train.count("<|endoftext|>") + val.count("<|endoftext|>") in (16, 17, 18)  # one EOS per file (the last of each split may be cut)
    for i in range(18):
        assert (f"file{i:02d}" in train) != (f"file{i:02d}" in val), f"file {i} is on both sides or neither"
    assert "\n" in val


def test_empty_data_file_says_it_is_empty(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=rf"data file {path} is empty: delete it"):
        prepare_data(DataConfig(source=str(path)), tiny_tokenizer, "h", Storage(str(tmp_path / "r")))


def test_blank_documents_are_refused_before_work(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "   "}\n{"text": ""}\n')
    with pytest.raises(DataError, match="no usable text"):
        prepare_data(DataConfig(source=str(path)), tiny_tokenizer, "h", Storage(str(tmp_path / "r")))


def test_missing_column_names_the_columns(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match=r"no column 'text'.*body"):
        prepare_data(DataConfig(source=str(path)), tiny_tokenizer, "h", Storage(str(tmp_path / "r")))


def test_row_formats_give_the_same_documents(tmp_path):
    docs = ["first, with a comma", "second\nwith a newline", 'third "quoted"']
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    pq.write_table(pa.table({"text": docs, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    pcsv.write_csv(pa.table({"n": [1, 2, 3], "text": docs}), tmp_path / "d.csv")
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv"):
        assert list(document_stream(DataConfig(source=str(tmp_path / name)))()) == docs, name


def test_unreachable_hub_dataset_says_so(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="could not read data source"):
        prepare_data(DataConfig(source="no-such-user/no-such-dataset"), tiny_tokenizer, "h", Storage(str(tmp_path)))


def test_fsspec_urls_are_read_directly_without_the_hub_or_datasets(s3_storage, tmp_path, tiny_tokenizer, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called for a file source")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    docs = [f"document {i} " * 30 for i in range(20)]
    s3_storage.write_bytes("src/d.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs}), buf)
    s3_storage.write_bytes("src/d.parquet", buf.getvalue().to_pybytes())
    for i, d in enumerate(docs):
        s3_storage.write_bytes(f"texts/sub/{i:02d}.txt", d.encode())

    results = {}
    for source in (s3_storage.url("src/d.jsonl"), s3_storage.url("src/d.parquet"), s3_storage.url("texts")):
        cfg = DataConfig(source=source, seq_len=16)
        assert list(document_stream(cfg, s3_storage)()) == docs, source
        ref = prepare_data(cfg, tiny_tokenizer, "h", s3_storage)
        results[source] = _rows(s3_storage, ref.train)
    first, *others = results.values()
    assert all(np.array_equal(first, o) for o in others)  # the same documents, whatever the format


def test_a_missing_url_names_it(s3_storage):
    with pytest.raises(DataError, match=r"data file s3://.*/nope.jsonl does not exist"):
        document_stream(DataConfig(source=s3_storage.url("nope.jsonl")), s3_storage)


# -- the stage -------------------------------------------------------------------------------------
def test_prepare_data_writes_uint16_shards_and_reuses(tmp_path, tiny_tokenizer):
    storage = Storage(str(tmp_path))
    cfg = DataConfig(seq_len=32, rows_per_shard=16, max_train_sequences=40, max_validation_sequences=8)
    ref = prepare_data(cfg, tiny_tokenizer, "tokhash", storage)
    assert ref.train_rows == 40 and ref.validation_rows == 8 and ref.vocab_size == len(tiny_tokenizer)
    shards = list(read_sequences(storage, ref.train))
    assert [name for name, *_ in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ids = np.concatenate([s[2] for s in shards])
    assert ids.shape == (40, 32) and ids.max() < len(tiny_tokenizer)
    assert (ids == tiny_tokenizer.eos_token_id).any()  # documents are separated by EOS
    again = prepare_data(cfg, tiny_tokenizer, "tokhash", storage)
    assert again == ref == load_data_ref(storage, ref.folder)


def _reference(docs, tokenizer, cfg):
    """The straightforward in-memory preparation: every document, split, tokenized and packed at once."""
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    sizes = np.array([len(ids) + 1 for ids in encoded])
    is_val = assign_validation(split_keys(_digests(docs), cfg.seed), sizes, cfg.validation_fraction)
    out = {}
    for split, mask, limit in (("train", ~is_val, cfg.max_train_sequences), ("validation", is_val, cfg.max_validation_sequences)):
        flat = np.array([t for ids, m in zip(encoded, mask) if m for t in ids + [tokenizer.eos_token_id]])
        out[split] = flat[: len(flat) // cfg.seq_len * cfg.seq_len].reshape(-1, cfg.seq_len)[:limit]
    return out


@pytest.mark.parametrize("limits", [(None, None), (23, 5)])
def test_streamed_preparation_equals_the_in_memory_reference(tmp_path, tiny_tokenizer, monkeypatch, limits):
    monkeypatch.setattr(data_module, "TOKENIZE_BATCH_DOCS", 3)  # many tokenizer batches
    docs = embedded_documents()[:30]
    cfg = DataConfig(seq_len=24, rows_per_shard=7, validation_fraction=0.25, seed=3,
                     max_train_sequences=limits[0], max_validation_sequences=limits[1])
    storage = Storage(str(tmp_path))
    monkeypatch.setattr(data_module, "document_stream", lambda cfg, storage: lambda: iter(["  ", *docs, None]))
    ref = prepare_data(cfg, tiny_tokenizer, "h", storage)
    expected = _reference(docs, tiny_tokenizer, cfg)
    for split, folder in (("train", ref.train), ("validation", ref.validation)):
        assert np.array_equal(_rows(storage, folder), expected[split]), split
        seq_ids = np.concatenate([s for _, s, _ in read_sequences(storage, folder)])
        assert seq_ids.tolist() == list(range(len(expected[split])))
    assert ref.train_rows == len(expected["train"]) and ref.validation_rows == len(expected["validation"])


def test_fingerprint_follows_content_config_tokenizer_and_split_rule(monkeypatch):
    cfg = DataConfig()
    base = data_fingerprint(cfg, "tok", "content")
    assert base != data_fingerprint(cfg, "tok", "other content")
    assert base != data_fingerprint(cfg, "other tok", "content")
    assert base != data_fingerprint(DataConfig(seed=1), "tok", "content")
    monkeypatch.setattr(data_module, "SPLIT_RULE", "another rule")
    assert base != data_fingerprint(cfg, "tok", "content")
