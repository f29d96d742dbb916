"""Data sources → documents, streamed: the embedded corpus, files (local or any fsspec URL), hub datasets.

A ``.txt`` file (and every file of the ``text`` builder) is ONE document, its newlines kept; a
``.parquet``, ``.jsonl``/``.json`` or ``.csv`` file holds one document per row, in column
``data.text_field``. Files are read directly through fsspec and pyarrow, never through ``datasets``,
so an ``s3://`` source reads the same whether or not the hub is reachable and whatever the datasets
cache holds. Only a hub dataset name goes through ``datasets`` (its Arrow cache, read in batches).
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

from distill_core.config import DataConfig
from distill_core.errors import DataError
from distill_core.storage import Storage, fs_for

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BATCH_ROWS = 1024  # rows read at a time from a Parquet/CSV file or a hub dataset

DocumentStream = Callable[[], Iterator]  # each call yields the source's raw documents again, in order


def embedded_documents() -> list[str]:
    """Python's pydoc topics: 79 documents of real English/code prose, present in every install."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def document_stream(cfg: DataConfig, storage: Storage | None = None) -> DocumentStream:
    """A function yielding the documents of ``cfg.source`` (raw values: blank or non-text ones included).

    Each call reads the source again from the start, so a caller can make several passes in bounded
    memory. Files are found (and a hub dataset is opened) now, so a missing source raises DataError
    before any pass. ``storage`` lends its options (credentials, endpoint) to URLs of its protocol.
    """
    if cfg.source == "embedded":
        return lambda: iter(embedded_documents())
    files = _data_files(cfg, storage)
    if files is None:
        return _hub_stream(cfg)
    if cfg.split != "train":
        raise DataError(
            f"data.split is {cfg.split!r}, but data files have no splits (only hub datasets do): "
            "leave data.split as 'train', or point data.source at the file of that split."
        )
    return lambda: (doc for file in files for doc in _read_file(*file, cfg.text_field))


# -- files -----------------------------------------------------------------------------------------
def _data_files(cfg: DataConfig, storage: Storage | None) -> list[tuple] | None:
    """[(fs, path, format, display name)] of a file source in reading order; None for a hub dataset."""
    builders = set(FORMATS.values())
    if cfg.source in builders:
        if not cfg.data_files:
            raise DataError(f"data.source is the builder {cfg.source!r} but data.data_files is empty: list the files to read.")
        return [(fs, p, cfg.source, name) for url in cfg.data_files for fs, p, name in _expand(url, storage)]
    if "://" not in cfg.source and not Path(cfg.source).expanduser().exists():
        return None
    files = []
    for fs, p, name in _expand(cfg.source, storage):
        fmt = FORMATS.get(Path(p).suffix.lower())
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {name}: use .txt, .json(l), .parquet or .csv, or set data.source "
                "to a builder name ('text', 'json', 'parquet', 'csv') with data.data_files."
            )
        files.append((fs, p, fmt, name))
    return files


def _expand(url: str, storage: Storage | None) -> list[tuple]:
    """[(fs, path, display name)] of the file, folder (its data files, recursively) or glob ``url``."""
    fs, path = fs_for(str(Path(url).expanduser()) if "://" not in url else url, storage)
    if any(c in path for c in "*?["):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if Path(p).suffix.lower() in FORMATS)
        if not paths:
            raise DataError(f"data folder {url} holds no .txt/.json/.jsonl/.parquet/.csv files: add some.")
    elif fs.isfile(path):
        paths = [path]
    else:
        raise DataError(f"data file {url} does not exist: check data.source / data.data_files.")
    if not paths:
        raise DataError(f"no data file matches {url}: check the pattern.")
    local = "://" not in url
    return [(fs, p, p if local else fs.unstrip_protocol(p)) for p in paths]


def _read_file(fs, path: str, fmt: str, name: str, field: str) -> Iterator:
    """The documents of one file: the whole text (``text``) or column ``field`` of each row."""
    if fs.size(path) == 0:
        raise DataError(f"data file {name} is empty: delete it, or fill it with documents.")
    with fs.open(path, "rb") as f:
        if fmt == "text":
            try:
                yield f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data file {name} is not UTF-8 text ({e}): convert it to UTF-8.") from None
        elif fmt == "parquet":
            yield from _parquet_rows(f, name, field)
        elif fmt == "csv":
            yield from _csv_rows(f, name, field)
        else:
            yield from _json_rows(f, name, field)


def _no_column(name: str, field: str, columns) -> DataError:
    return DataError(
        f"data file {name} has no column {field!r} (columns: {sorted(columns)}): "
        "set data.text_field to the column holding the text."
    )


def _parquet_rows(f, name: str, field: str) -> Iterator:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError for files that are not Parquet
        raise DataError(f"data file {name} is not a Parquet file ({e}): check the file.") from None
    if field not in parquet.schema_arrow.names:
        raise _no_column(name, field, parquet.schema_arrow.names)
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        yield from batch.column(0).to_pylist()


def _csv_rows(f, name: str, field: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        reader = pcsv.open_csv(
            f,
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={field: pa.string()}),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"data file {name} is not readable CSV ({e}): check the file.") from None
    if field not in reader.schema.names:
        raise _no_column(name, field, reader.schema.names)
    column = reader.schema.get_field_index(field)
    for batch in reader:
        yield from batch.column(column).to_pylist()


def _json_rows(f, name: str, field: str) -> Iterator:
    """JSON Lines (one object per line), or one JSON array of objects (read whole)."""
    text = io.TextIOWrapper(f, encoding="utf-8")
    head = text.read(1)
    while head.isspace():
        head = text.read(1)
    if head == "[":
        try:
            records = json.loads(head + text.read())
        except json.JSONDecodeError as e:
            raise DataError(f"data file {name} is not valid JSON ({e}): fix the file.") from None
        lines = enumerate(records, start=1)
    else:
        lines = _json_lines(itertools.chain([head + text.readline()], text), name)
    first = True
    for number, record in lines:
        if not isinstance(record, dict):
            raise DataError(f"data file {name}, record {number}: expected a JSON object with {field!r}, got {type(record).__name__}.")
        if first and field not in record:
            raise _no_column(name, field, record)
        first = False
        yield record.get(field)


def _json_lines(lines: Iterator[str], name: str) -> Iterator[tuple[int, object]]:
    """(line number, object) of each non-blank line."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data file {name}, line {number}: not valid JSON ({e}): fix that line.") from None


# -- hub -------------------------------------------------------------------------------------------
def _hub_stream(cfg: DataConfig) -> DocumentStream:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except FileNotFoundError as e:
        raise DataError(f"data source {cfg.source!r} not found ({e}): check the path or hub name.") from None
    except Exception as e:  # datasets raises many types for unreachable hubs and bad names
        raise DataError(
            f"could not read data source {cfg.source!r}: {type(e).__name__}: {e}. "
            "Check the name and network access (hub datasets need the hub; local files and URLs do not)."
        ) from None
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"data source {cfg.source!r} has no column {cfg.text_field!r} (columns: {ds.column_names}): "
            "set data.text_field to the column holding the text."
        )
    column = ds.select_columns([cfg.text_field])
    return lambda: (doc for batch in column.iter(batch_size=BATCH_ROWS) for doc in batch[cfg.text_field])
