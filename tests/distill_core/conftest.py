import pytest

from distill_core.batches import step_batches, topk_stream
from distill_core.config import DataConfig, TopKConfig
from distill_core.data import prepare_data
from distill_core.storage import Storage
from distill_core.teacher.topk import cache_topk


@pytest.fixture
def topk_run(tmp_path, tiny_tokenizer, tiny_teacher):
    """(storage, batches) over a small prepared data set and its top-k cache: ``batches(skip)`` as train() takes it."""
    storage = Storage(str(tmp_path / "root"))
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=24), tiny_tokenizer, "tok", storage)
    cache = cache_topk(lambda: tiny_teacher, data, {"source": "t", "fingerprint": "f", "dtype": "float32"}, TopKConfig(k=4), storage)
    stream = topk_stream(storage, data, cache, seed=0)
    batches = step_batches({"data": stream}, batch_size=4, pad_id=0)
    return storage, batches


@pytest.fixture
def prepared(tmp_path, tiny_tokenizer):
    """(storage, DataRef) of a small prepared data set over the tiny tokenizer: three train shards of 8 rows."""
    storage = Storage(str(tmp_path / "root"))
    cfg = DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=24, max_validation_sequences=4)
    return storage, prepare_data(cfg, tiny_tokenizer, "tok", storage)
