"""Text source → documents → train/validation split by document → tokens → packed Parquet shards.

The split is by document and by token share: validation gets whole documents holding about
``data.validation_fraction`` of the tokens (see :func:`assign_validation`), decided by each
document's text and ``data.seed`` alone. Sources are read by :mod:`distill_core.documents`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from distill_core.cache.shards import ShardStore, list_array, read_manifest
from distill_core.config import DataConfig
from distill_core.documents import document_stream
from distill_core.errors import DataError
from distill_core.storage import Storage, fingerprint

log = logging.getLogger(__name__)

# Part of every data fingerprint: a new split rule gives new addresses, never old folders with new contents.
SPLIT_RULE = "token-share/1"
SHARE_TOLERANCE = 0.25  # warn when validation's token share misses the fraction by more than this share of it
TOKENIZE_BATCH_DOCS = 256  # documents per tokenizer call ...
TOKENIZE_BATCH_CHARS = 1_000_000  # ... or fewer, once they hold this many characters (~50 MiB of encodings)
DATA_COLUMNS = ("seq_id", "input_ids")  # what _write_rows writes and the readers below read


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


# -- the split -------------------------------------------------------------------------------------
def split_keys(digests: np.ndarray, seed: int) -> np.ndarray:
    """Each document's place in the split order: uint64 [n] from its content digest (uint8 [n, 16]) and the seed.

    A document's key depends only on its text and ``data.seed``, so it keeps its place as data grows,
    and identical documents get the same key (and therefore the same side)."""
    prefix = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + row.tobytes()).digest()[:8], "big") for row in digests),
        dtype=np.uint64, count=len(digests),
    )


def assign_validation(keys: np.ndarray, sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents go to validation: bool [n], from split keys uint64 [n] and token counts int64 [n].

    Documents are taken in key order (a shuffle fixed by the seed); each joins validation while it
    fits under ``fraction`` of all tokens, then a second walk adds any that still bring validation
    closer to that target. A document too large for validation stays in training and smaller ones
    after it fill the share, so the token share lands near ``fraction`` whatever the sizes.
    Identical documents (equal keys) are decided together: a text is never on both sides.
    """
    unique, group = np.unique(keys, return_inverse=True)
    group_sizes = np.bincount(group, weights=sizes, minlength=len(unique))
    target = fraction * float(sizes.sum())
    chosen = np.zeros(len(unique), dtype=bool)
    taken = 0.0
    for within in (True, False):  # first only what fits under the target, then what still gets closer to it
        for g, size in enumerate(group_sizes.tolist()):
            if not chosen[g] and (taken + size <= target if within else taken + size / 2 < target):
                chosen[g] = True
                taken += size
    return chosen[group]


def _check_split(is_val: np.ndarray, sizes: np.ndarray, fraction: float) -> None:
    """Refuse a split with an empty side; log the token shares, and warn when they miss ``fraction``."""
    n_val = int(is_val.sum())
    if n_val == 0 or n_val == len(is_val):
        raise DataError(
            f"splitting {len(is_val)} documents with validation_fraction={fraction} left {len(is_val) - n_val} "
            f"for training and {n_val} for validation: add documents or change the fraction."
        )
    share = float(sizes[is_val].sum()) / float(sizes.sum())
    message = (
        f"validation holds {share:.2%} of the tokens ({n_val} of {len(is_val)} documents), "
        f"training {1 - share:.2%}; data.validation_fraction asks for {fraction:.2%}"
    )
    if abs(share - fraction) > SHARE_TOLERANCE * fraction:
        log.warning("%s: the documents are too few or too unequal in size to get closer; "
                    "add documents or split large ones.", message)
    else:
        log.info(message)


# -- packing ---------------------------------------------------------------------------------------
def pack(token_docs: Iterable[np.ndarray], seq_len: int, rows_per_chunk: int) -> Iterator[np.ndarray]:
    """Concatenate documents (each already ending in EOS) and cut into rows of ``seq_len``.

    Yields int64 [rows, seq_len] chunks of ``rows_per_chunk`` rows as they fill (the last may be
    shorter); the remainder under ``seq_len`` tokens is dropped. Holds about one chunk plus one
    document at a time, however long the stream.
    """
    chunk_tokens = seq_len * rows_per_chunk
    pending: list[np.ndarray] = []
    count = 0
    for doc in token_docs:
        pending.append(np.asarray(doc, dtype=np.int64))
        count += len(pending[-1])
        if count < chunk_tokens:
            continue
        flat = pending[0] if len(pending) == 1 else np.concatenate(pending)
        full = len(flat) // chunk_tokens * chunk_tokens
        for start in range(0, full, chunk_tokens):  # slices of one array: a huge document is not copied
            yield flat[start : start + chunk_tokens].reshape(rows_per_chunk, seq_len)
        pending, count = [flat[full:]], len(flat) - full
    flat = np.concatenate(pending) if pending else np.zeros(0, np.int64)
    rows = len(flat) // seq_len
    if rows:
        yield flat[: rows * seq_len].reshape(rows, seq_len)


# -- stage -----------------------------------------------------------------------------------------
def data_fingerprint(cfg: DataConfig, tokenizer_hash: str, content: str) -> str:
    """Address of a prepared dataset: its config, tokenizer, documents (``content`` digest) and split rule."""
    return fingerprint({"data": cfg.model_dump(), "tokenizer": tokenizer_hash, "content": content, "split_rule": SPLIT_RULE})


def prepare_data(cfg: DataConfig, tokenizer, tokenizer_hash: str, storage: Storage) -> DataRef:
    """Tokenize and pack ``cfg.source`` into ``data/<fp>/{train,validation}`` shards; resumes and reuses.

    Memory is bounded by one tokenizer batch, one shard and a few numbers per document, however
    large the source: pass 1 reads the documents to address them (content digests), pass 2
    tokenizes them into a local temporary file of token ids, the split is chosen from the token
    counts, and pass 3 packs each split from that file, writing each shard as it fills. A shard is
    committed in its split's manifest once written; a finished dataset is marked complete and is
    then only read.
    """
    stream = document_stream(cfg, storage)
    digests, selected = _scan(stream, cfg)
    content = hashlib.sha256(digests.tobytes()).hexdigest()
    fp = data_fingerprint(cfg, tokenizer_hash, content)
    folder = f"data/{fp}"
    vocab_size = len(tokenizer)
    meta = {"tokenizer_hash": tokenizer_hash, "seq_len": cfg.seq_len, "vocab_size": vocab_size, "source": cfg.source}
    limits = {"train": cfg.max_train_sequences, "validation": cfg.max_validation_sequences}
    stores = {split: ShardStore(storage, f"{folder}/{split}", kind="data", fingerprint=fp, meta=meta) for split in limits}
    todo = [split for split, store in stores.items() if not store.complete]
    if todo:
        if tokenizer.eos_token_id is None:
            raise DataError("the teacher's tokenizer has no EOS token to separate documents: give it one (eos_token).")
        dtype = np.dtype(id_type(vocab_size).to_pandas_dtype())
        with tempfile.TemporaryDirectory(prefix="distillery-tokens-") as tmp:
            token_file = Path(tmp) / "tokens.bin"
            lengths = _tokenize_to_file(_selected_documents(stream, selected), tokenizer, token_file, dtype)
            sizes = lengths + 1  # each document is packed with its EOS
            is_val = assign_validation(split_keys(digests, cfg.seed), sizes, cfg.validation_fraction)
            _check_split(is_val, sizes, cfg.validation_fraction)
            for split in todo:
                mask = is_val if split == "validation" else ~is_val
                if int(sizes[mask].sum()) < cfg.seq_len:
                    raise DataError(
                        f"the {split} split has fewer than {cfg.seq_len} tokens: lower data.seq_len or add documents."
                    )
                docs = _read_tokens(token_file, lengths, mask, dtype, tokenizer.eos_token_id)
                rows = _write_rows(stores[split], pack(docs, cfg.seq_len, cfg.rows_per_shard), limits[split], id_type(vocab_size))
                stores[split].finalize({"rows": rows, "tokens": rows * cfg.seq_len})
    return DataRef(
        fp, folder, tokenizer_hash, cfg.seq_len, vocab_size, stores["train"].num_rows, stores["validation"].num_rows
    )


def _usable(doc) -> bool:
    return isinstance(doc, str) and bool(doc.strip())


def _scan(stream, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: content digests uint8 [n, 16] of the documents used, and which usable documents those are (bool)."""
    digests = bytearray()
    for doc in stream():
        if _usable(doc):
            digests += hashlib.sha256(doc.encode()).digest()[:16]
    if not digests:
        raise DataError(
            f"data source {cfg.source!r} has no usable text in column {cfg.text_field!r}: "
            "point data.source at text documents, or set data.text_field to the column that holds them."
        )
    table = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, 16)
    selected = np.ones(len(table), dtype=bool)
    if cfg.max_documents is not None:
        selected[:] = False
        selected[np.random.default_rng(cfg.seed).permutation(len(table))[: cfg.max_documents]] = True
    return table[selected], selected


def _selected_documents(stream, selected: np.ndarray) -> Iterator[str]:
    """Pass 2's documents: the usable ones that ``selected`` keeps, in source order."""
    usable = (doc for doc in stream() if _usable(doc))
    return (doc for doc, keep in zip(usable, selected) if keep)


def _tokenize_to_file(docs: Iterable[str], tokenizer, path: Path, dtype: np.dtype) -> np.ndarray:
    """Tokenize ``docs`` in batches, appending their ids (no EOS) to ``path``; returns tokens per document, int64 [n]."""
    lengths = array("q")  # 8 bytes per document, not a Python int object each
    with open(path, "wb") as out:
        for batch in _batches(docs):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                lengths.append(len(ids))
    return np.frombuffer(lengths, dtype=np.int64).copy()


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_tokens(path: Path, lengths: np.ndarray, mask: np.ndarray, dtype: np.dtype, eos: int) -> Iterator[np.ndarray]:
    """The documents that ``mask`` selects, read back from ``path`` in order, each with EOS appended."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]) * dtype.itemsize
    with open(path, "rb") as f:
        for i in np.flatnonzero(mask):
            f.seek(int(offsets[i]))
            ids = np.fromfile(f, dtype=dtype, count=int(lengths[i]))
            yield np.append(ids.astype(np.int64), eos)


def _write_rows(store: ShardStore, chunks: Iterator[np.ndarray], limit: int | None, ids: pa.DataType) -> int:
    """Write ``chunks`` (int64 [rows, T], one per shard) as shards, stopping at ``limit`` rows; returns rows written."""
    start = 0
    for index, chunk in enumerate(chunks):
        if limit is not None:
            chunk = chunk[: limit - start]
        name = f"part-{index:05d}.parquet"
        if not store.committed(name):
            table = pa.table({
                "seq_id": pa.array(np.arange(start, start + len(chunk)), pa.int64()),
                "input_ids": list_array(chunk.astype(ids.to_pandas_dtype()), ids),
            })
            store.write_shard(name, table)
        start += len(chunk)
        if limit is not None and start >= limit:
            break
    return start


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


def first_train_sequences(storage: Storage, data: DataRef, n: int) -> np.ndarray:
    """The first ``n`` train sequences in shard order (fewer when the split is smaller): int64 ``[n, T]``."""
    rows, have = [np.zeros((0, data.seq_len), dtype=np.int64)], 0
    for _, _, ids in read_sequences(storage, data.train):
        rows.append(ids[: n - have])
        have += len(rows[-1])
        if have >= n:
            break
    return np.concatenate(rows)


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
