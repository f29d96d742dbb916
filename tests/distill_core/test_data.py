import numpy as np
import pytest

from distill_core.config import DataConfig
from distill_core.data import embedded_documents, load_data_ref, pack, prepare_data, read_sequences, split_documents
from distill_core.errors import DataError
from distill_core.storage import Storage


def test_pack_concatenates_and_drops_remainder():
    rows = pack(iter([[1, 2, 0], [3, 4, 5, 0]]), 3)
    assert rows.tolist() == [[1, 2, 0], [3, 4, 5]]


def test_split_is_by_document_and_stable_under_growth():
    docs = [f"document {i}" for i in range(200)]
    train, val = split_documents(docs, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200
    assert 20 < len(val) < 60
    train2, val2 = split_documents(docs + ["new doc"], 0.2, seed=0)
    assert set(val) <= set(val2)


def test_embedded_corpus_is_real_text():
    docs = embedded_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


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


def test_local_text_files_are_a_source(tmp_path, tiny_tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i}\n" * 20)
    cfg = DataConfig(source=str(folder), seq_len=16, validation_fraction=0.2)
    ref = prepare_data(cfg, tiny_tokenizer, "tokhash", Storage(str(tmp_path / "root")))
    assert ref.train_rows > 0 and ref.validation_rows > 0


def test_empty_dataset_is_refused_before_work(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "   "}\n{"text": ""}\n')
    with pytest.raises(DataError, match="no usable text"):
        prepare_data(DataConfig(source=str(path)), tiny_tokenizer, "h", Storage(str(tmp_path / "r")))


def test_missing_column_names_the_columns(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match=r"no column 'text'.*body"):
        prepare_data(DataConfig(source=str(path)), tiny_tokenizer, "h", Storage(str(tmp_path / "r")))


def test_unreachable_hub_dataset_says_so(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="could not read data source"):
        prepare_data(DataConfig(source="no-such-user/no-such-dataset"), tiny_tokenizer, "h", Storage(str(tmp_path)))
