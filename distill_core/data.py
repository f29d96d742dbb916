"""Text source → documents → train/validation split by document → tokens → packed Parquet shards."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from distill_core.cache.shards import ShardStore, list_array, read_manifest
from distill_core.config import DataConfig
from distill_core.errors import DataError
from distill_core.storage import Storage, fingerprint

DATA_COLUMNS = ("seq_id", "input_ids")  # what _write_rows writes and the readers below read
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DataRef:
    """Where a prepared dataset lives and what it is; passed between stages as plain JSON."""

    fingerprint: str
    folder: str  # data/<fingerprint>, relative to the storage root
    tokenizer_hash: str
    seq_len: int
    vocab_size: int
    train_rows: int
    validation_rows: int

    @property
    def train(self) -> str:
        return f"{self.folder}/train"

    @property
    def validation(self) -> str:
        return f"{self.folder}/validation"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataRef":
        return cls(**d)


def id_type(vocab_size: int) -> pa.DataType:
    """uint16 when every id fits (vocabularies under 65,536, e.g. GPT-2, SmolLM2): half the bytes of uint32."""
    return pa.uint16() if vocab_size <= 2**16 else pa.uint32()


# -- sources ---------------------------------------------------------------------------------------
def embedded_documents() -> list[str]:
    """Python's pydoc topics: 79 documents of real English/code prose, present in every install."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_documents(cfg: DataConfig, storage_options: dict | None = None) -> list[str]:
    """Read the documents of ``cfg.source``; raises DataError naming the source and the fix."""
    if cfg.source == "embedded":
        docs = embedded_documents()
    else:
        docs = _load_with_datasets(cfg, storage_options or {})
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if cfg.max_documents is not None:
        order = np.random.default_rng(cfg.seed).permutation(len(docs))[: cfg.max_documents]
        docs = [docs[i] for i in sorted(order)]
    if not docs:
        raise DataError(
            f"data source {cfg.source!r} has no usable text in column {cfg.text_field!r}: "
            "point data.source at text documents, or set data.text_field to the column that holds them."
        )
    return docs


def _load_with_datasets(cfg: DataConfig, storage_options: dict) -> list[str]:
    import datasets

    builder, data_files = cfg.source, list(cfg.data_files)
    if builder not in set(BUILDERS.values()):
        path = Path(cfg.source)
        if "://" in cfg.source or path.exists():
            data_files = [cfg.source] if "://" in cfg.source or path.is_file() else sorted(
                str(p) for p in path.rglob("*") if p.suffix in BUILDERS
            )
            if not data_files:
                raise DataError(f"data folder {cfg.source} holds no .txt/.json/.jsonl/.parquet/.csv files: add some.")
            builder = BUILDERS.get(Path(data_files[0].split("?")[0]).suffix)
            if builder is None:
                raise DataError(f"cannot tell the format of {data_files[0]}: use .txt, .json(l), .parquet or .csv.")
    elif not data_files:
        raise DataError(f"data.source is the builder {builder!r} but data.data_files is empty: list the files to read.")
    try:
        if data_files:
            ds = datasets.load_dataset(builder, data_files=data_files, split=cfg.split, storage_options=storage_options)
        else:
            ds = datasets.load_dataset(builder, cfg.subset, split=cfg.split)
    except FileNotFoundError as e:
        raise DataError(f"data source {cfg.source!r} not found ({e}): check the path or hub name.") from None
    except Exception as e:  # datasets raises many types for unreachable hubs and bad files
        raise DataError(
            f"could not read data source {cfg.source!r}: {type(e).__name__}: {e}. "
            "Check the name, the files and network access (hub datasets need the hub; local files do not)."
        ) from None
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"data source {cfg.source!r} has no column {cfg.text_field!r} (columns: {ds.column_names}): "
            "set data.text_field to the column holding the text."
        )
    return list(ds[cfg.text_field])


def split_documents(docs: list[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by document, deterministically per document text: a document stays on its side as data grows."""
    train, val = [], []
    for doc in docs:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{doc}".encode()).digest()[:8], "big") / 2**64
        (val if h < validation_fraction else train).append(doc)
    if not train or not val:
        raise DataError(
            f"splitting {len(docs)} documents with validation_fraction={validation_fraction} left "
            f"{len(train)} for training and {len(val)} for validation: add documents or change the fraction."
        )
    return train, val


def pack(token_docs: Iterator[list[int]], seq_len: int) -> np.ndarray:
    """Concatenate documents (each already ending in EOS) and cut into rows of ``seq_len``; drops the remainder.

    Returns int64 [rows, seq_len].
    """
    flat = np.fromiter((t for doc in token_docs for t in doc), dtype=np.int64)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


# -- stage -----------------------------------------------------------------------------------------
def data_fingerprint(cfg: DataConfig, tokenizer_hash: str, docs: list[str]) -> str:
    content = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    return fingerprint({"data": cfg.model_dump(), "tokenizer": tokenizer_hash, "content": content})


def prepare_data(cfg: DataConfig, tokenizer, tokenizer_hash: str, storage: Storage) -> DataRef:
    """Tokenize and pack ``cfg.source`` into ``data/<fp>/{train,validation}`` shards; resumes and reuses.

    A shard is committed in its split's manifest once written; a finished dataset is marked
    complete and is then only read.
    """
    docs = load_documents(cfg, storage.storage_options)
    fp = data_fingerprint(cfg, tokenizer_hash, docs)
    folder = f"data/{fp}"
    vocab_size = len(tokenizer)
    meta = {"tokenizer_hash": tokenizer_hash, "seq_len": cfg.seq_len, "vocab_size": vocab_size, "source": cfg.source}
    train_docs, val_docs = split_documents(docs, cfg.validation_fraction, cfg.seed)
    counts = {}
    for split, split_docs, limit in (
        ("train", train_docs, cfg.max_train_sequences),
        ("validation", val_docs, cfg.max_validation_sequences),
    ):
        store = ShardStore(storage, f"{folder}/{split}", kind="data", fingerprint=fp, meta=meta)
        if not store.complete:
            rows = _tokenize_and_pack(split_docs, tokenizer, cfg.seq_len)[:limit]
            if len(rows) == 0:
                raise DataError(
                    f"the {split} split has fewer than {cfg.seq_len} tokens: lower data.seq_len or add documents."
                )
            _write_rows(store, rows, cfg.rows_per_shard, id_type(vocab_size))
            store.finalize({"rows": len(rows), "tokens": int(rows.size)})
        counts[split] = store.num_rows
    return DataRef(fp, folder, tokenizer_hash, cfg.seq_len, vocab_size, counts["train"], counts["validation"])


def _tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> np.ndarray:
    if tokenizer.eos_token_id is None:
        raise DataError("the teacher's tokenizer has no EOS token to separate documents: give it one (eos_token).")
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return pack((ids + [tokenizer.eos_token_id] for ids in encoded), seq_len)


def _write_rows(store: ShardStore, rows: np.ndarray, rows_per_shard: int, ids: pa.DataType) -> None:
    for index, start in enumerate(range(0, len(rows), rows_per_shard)):
        name = f"part-{index:05d}.parquet"
        if store.committed(name):
            continue
        chunk = rows[start : start + rows_per_shard]
        table = pa.table({
            "seq_id": pa.array(np.arange(start, start + len(chunk)), pa.int64()),
            "input_ids": list_array(chunk.astype(ids.to_pandas_dtype()), ids),
        })
        store.write_shard(name, table)


def load_data_ref(storage: Storage, folder: str) -> DataRef:
    """Rebuild a DataRef from a prepared dataset's manifests (for stages run alone on a run id)."""
    train, val = read_manifest(storage, f"{folder}/train"), read_manifest(storage, f"{folder}/validation")
    for m, split in ((train, "train"), (val, "validation")):
        if not m["complete"]:
            raise DataError(f"{storage.url(folder)}/{split} is not complete: rerun prepare_data.")
    meta = train["meta"]
    rows = lambda m: sum(s["rows"] for s in m["shards"])  # noqa: E731
    return DataRef(train["fingerprint"], folder, meta["tokenizer_hash"], meta["seq_len"], meta["vocab_size"], rows(train), rows(val))


def read_sequences(storage: Storage, folder: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (shard name, seq_ids int64 [n], input_ids int64 [n, T]) for each committed shard of a split."""
    store = _open_split(storage, folder)
    for entry, table in store.iter_tables(DATA_COLUMNS):
        yield entry.name, table["seq_id"].to_numpy(), _list_column(table["input_ids"])


def read_data_shard(storage: Storage, folder: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One committed shard of a split: seq_ids int64 [n], input_ids int64 [n, T]."""
    table = _open_split(storage, folder).read_shard(name, DATA_COLUMNS)
    return table["seq_id"].to_numpy(), _list_column(table["input_ids"])


def _open_split(storage: Storage, folder: str) -> ShardStore:
    m = read_manifest(storage, folder)
    return ShardStore(storage, folder, kind="data", fingerprint=m["fingerprint"], meta=m["meta"])


def _list_column(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed-length list column as a 2-D int64 array."""
    arr = col.combine_chunks()
    n = len(arr)
    return arr.values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(n, -1)
