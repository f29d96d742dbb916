"""Compact encoding of the teacher's sparse targets (top-k, sampled, hybrid), vectorised both ways.

A position keeps a *head* (its top-k, exact; none for ``sampled``) and *drawn* ids (the unique ids of
m draws from the teacher, with their counts; none for ``topk``). Per sequence row, a shard stores one
binary column per field, each holding that row's positions back to back (zstd then compresses each
column on its own):

  ids      per position the head ids, then the drawn ids, each group coded as the ids' ranks in the
           shard's dictionary, ascending and delta-coded (first rank, then gap − 1) as LEB128 varints:
           1 byte for a gap under 128, 2 under 16,384. Frequent ids get small ranks, so a position's
           common ids cost about a byte each
  dictionary  (first row only) the shard's distinct ids ascending, delta-coded, then their order by
           frequency (most frequent first, ties by id): rank r is the r-th id of that order
  n_drawn  uint8 per position: how many unique ids the draws gave (sampled, hybrid)
  counts   uint8 per drawn id: how many of the m draws gave it (m ≤ 255)
  dlogit   uint8 per kept id: round((z_ref − z) / step), z the teacher's raw logit at the id and z_ref
           the largest kept logit of the position
  step     float16 per position: max(z_ref − z) / 255, to float16 (so the largest gap codes as 255)
  lognorm  float16 per position and temperature τ: L_τ = logsumexp(z / τ) − z_ref / τ ≥ 0
  tail     uint16 per position and τ (head only): −log(teacher mass outside the head at τ) in 1/2048
           nat, clamped at 65,534 (mass under 1.3e-14); 65,535 when nothing is outside

Raw logits plus the log-normaliser at each listed τ give log p_τ(i) = −(z_ref − z_i) / τ − L_τ at any
of them, so one capture serves students at every listed temperature.

Error bound (tested): |Δ log p_τ| ≤ step / (2τ) + 2^-11 · L_τ (the dlogit rounding plus float16
rounding of L_τ), and |Δ tail| ≤ 1/4096 nat within its range. Ids and counts are exact (each group's
ids come back in rank order). Decoding the quantised fields and encoding them again gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distill_core.errors import CacheError

CODEC = 2  # today's codec; a cache without "codec" in its manifest is the float16 one (teacher/topk.py)
_TAIL_SCALE = 2048.0  # tail steps per nat
_TAIL_NONE = 65535  # nothing outside the head
_TAIL_MAX = 65534
_STEP_MIN = np.float16(2.0**-14)  # the smallest normal float16: below it float16 loses precision


@dataclass
class SparseRows:
    """Sparse targets of N positions as flat numpy arrays (before quantisation, or decoded).

    head:    ids per position kept exactly (the top-k; 0 for sampled).
    ids:     int64 [E], per position its ``head`` ids, then its drawn ids (in any order within each
             group when encoding; decoded, by rank in the shard's dictionary).
    logits:  float32 [E], the teacher's raw logits at ``ids`` (decoded: relative to the position's
             largest kept logit, so ≤ 0).
    lse:     float32 [N, nT], logsumexp(z / τ) over the vocabulary at each temperature (decoded:
             relative to the largest kept logit, i.e. L_τ).
    n_drawn: int64 [N], unique drawn ids per position (all 0 for topk).
    counts:  int64 [E − N·head], draws that gave each drawn id, in ``ids`` order (ids unique within a group).
    tail:    float32 [N, nT], log teacher mass outside the head at each τ (−inf: none); None when head = 0.
    """

    head: int
    ids: np.ndarray
    logits: np.ndarray
    lse: np.ndarray
    n_drawn: np.ndarray
    counts: np.ndarray
    tail: np.ndarray | None

    @property
    def positions(self) -> int:  # N
        return self.lse.shape[0]

    def sizes(self) -> np.ndarray:
        """Kept ids per position: int64 [N]."""
        return self.head + self.n_drawn


# -- varints -------------------------------------------------------------------------------------
def varint_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LEB128 of non-negative int64 values [E]: (bytes uint8 [B], bytes per value int64 [E])."""
    v = values.astype(np.uint64)
    nbytes = np.ones(len(v), dtype=np.int64)
    for j in range(1, 10):
        nbytes += v >= np.uint64(1) << np.uint64(7 * j)
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    start = np.cumsum(nbytes) - nbytes
    for j in range(int(nbytes.max(initial=1))):
        has = nbytes > j
        byte = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[start[has] + j] = (byte | more).astype(np.uint8)
    return out, nbytes


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`: uint8 [B] → int64 [E]."""
    if len(data) == 0:
        return np.zeros(0, dtype=np.int64)
    end = data < 0x80
    if not end[-1]:
        raise CacheError("a cache shard's ids end inside a varint (truncated shard): recompute the cache.")
    starts = np.flatnonzero(np.concatenate([[True], end[:-1]]))
    lengths = np.diff(starts, append=len(data))
    values = (data[starts] & 0x7F).astype(np.int64)
    # One pass per byte position, over the values that long only (most are 1–2 bytes).
    for j in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > j)
        values[longer] |= (data[starts[longer] + j] & 0x7F).astype(np.int64) << (7 * j)
    return values


def _group_starts(sizes: np.ndarray) -> np.ndarray:
    """Start offset of each group of ``sizes`` [G] in the flat array: int64 [G]."""
    return np.cumsum(sizes) - sizes


def _groups(rows: SparseRows) -> np.ndarray:
    """Sizes of the delta-coded id groups, in flat order: head, drawn per position ([2N] or [N])."""
    n = rows.positions
    if rows.head == 0:
        return rows.n_drawn
    if not rows.n_drawn.any():
        return np.full(n, rows.head, dtype=np.int64)
    return np.stack([np.full(n, rows.head, dtype=np.int64), rows.n_drawn], axis=1).reshape(-1)


def _delta(ids: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per group: the first value, then each gap − 1 (values strictly ascending within a group)."""
    gaps = np.diff(ids, prepend=0) - 1
    first = _group_starts(groups)[groups > 0]
    gaps[first] = ids[first]
    return gaps


def _undelta(gaps: np.ndarray, groups: np.ndarray) -> np.ndarray:
    steps = gaps + 1
    first = _group_starts(groups)[groups > 0]
    steps[first] = gaps[first]
    total = np.cumsum(steps)
    base = np.repeat(total[first] - steps[first], groups[groups > 0])
    return total - base


# -- quantisation ----------------------------------------------------------------------------------
@dataclass
class Quantised:
    """The integer fields of :class:`SparseRows` as stored (see the module docstring)."""

    head: int
    dictionary: np.ndarray  # uint8: varints [number of distinct ids, their deltas, their frequency order]
    id_bytes: np.ndarray  # uint8 [B]
    id_nbytes: np.ndarray  # int64 [E] (encoding only; decoding recovers values without it)
    n_drawn: np.ndarray  # uint8 [N]
    counts: np.ndarray  # uint8 [D]
    dlogit: np.ndarray  # uint8 [E]
    step: np.ndarray  # float16 [N]
    lognorm: np.ndarray  # float16 [N, nT]
    tail: np.ndarray | None  # uint16 [N, nT]


def by_rank(rows: SparseRows) -> tuple[SparseRows, np.ndarray, np.ndarray]:
    """``rows`` with each group's ids in rank order, the ranks [E], and the dictionary (ids by rank).

    Ranks: ids by how often the shard keeps them, most often first, ties by id; a function of the
    shard's ids alone, so decoded rows rank (and encode) the same way again."""
    distinct, inverse, counts = np.unique(rows.ids, return_inverse=True, return_counts=True)
    order = np.lexsort((distinct, -counts))
    rank_of = np.empty(len(distinct), dtype=np.int64)
    rank_of[order] = np.arange(len(distinct))
    rank = rank_of[inverse.reshape(-1)]
    groups = _groups(rows)
    perm = np.lexsort((rank, np.repeat(np.arange(len(groups)), groups)))
    drawn = drawn_mask(rows).mask
    full_counts = np.zeros(len(rows.ids), dtype=np.int64)
    full_counts[drawn] = rows.counts
    ranked = SparseRows(rows.head, rows.ids[perm], rows.logits[perm], rows.lse, rows.n_drawn, full_counts[perm][drawn], rows.tail)
    return ranked, rank[perm], distinct[order]


def quantise(rows: SparseRows, temperatures: list[float]) -> Quantised:
    """Quantise ``rows`` (module docstring); ``temperatures`` are the τ of ``rows.lse``'s columns."""
    sizes = rows.sizes()
    if (sizes == 0).any():
        raise ValueError("every position must keep at least one id")
    if rows.counts.size and rows.counts.max() > 255:
        raise ValueError(f"a drawn id's count {rows.counts.max()} exceeds 255: draw at most 255 times a position")
    rows, rank, ids_by_rank = by_rank(rows)
    distinct = np.sort(ids_by_rank)
    order = np.searchsorted(distinct, ids_by_rank)
    dictionary, _ = varint_encode(np.concatenate([[len(distinct)], _delta(distinct, np.array([len(distinct)])), order]))
    starts = _group_starts(sizes)
    pos = np.repeat(np.arange(len(sizes)), sizes)
    z = rows.logits.astype(np.float64)
    z_ref = np.maximum.reduceat(z, starts)
    d = z_ref[pos] - z
    max_d = np.maximum.reduceat(d, starts)
    # Nearest float16 to max_d/255: within 2^-11 of it, so max_d / step rounds to 255, never 256,
    # and the step of decoded values (255·step) is this step again (bit-exact re-encode).
    step = np.maximum(np.float16(max_d / 255.0), _STEP_MIN).astype(np.float16)
    dlogit = np.clip(np.rint(d / step.astype(np.float64)[pos]), 0, 255).astype(np.uint8)
    taus = np.asarray(temperatures, dtype=np.float64)
    lognorm = (rows.lse.astype(np.float64) - z_ref[:, None] / taus[None, :]).astype(np.float16)
    tail = None
    if rows.head:
        t = np.rint(-rows.tail.astype(np.float64) * _TAIL_SCALE)
        tail = np.where(np.isneginf(rows.tail), _TAIL_NONE, np.clip(np.nan_to_num(t, posinf=_TAIL_MAX), 0, _TAIL_MAX)).astype(np.uint16)
    id_bytes, id_nbytes = varint_encode(_delta(rank, _groups(rows)))
    return Quantised(rows.head, dictionary, id_bytes, id_nbytes, rows.n_drawn.astype(np.uint8), rows.counts.astype(np.uint8),
                     dlogit, step, lognorm, tail)


def dequantise(q: Quantised) -> SparseRows:
    """The values ``q`` stands for, logits and lse relative to each position's largest kept logit."""
    n_drawn = q.n_drawn.astype(np.int64)
    sizes = q.head + n_drawn
    groups = _groups(SparseRows(q.head, np.zeros(0), np.zeros(0), q.lognorm, n_drawn, np.zeros(0), None))
    gaps = varint_decode(q.id_bytes)
    if len(gaps) != int(sizes.sum()):
        raise CacheError(f"a cache shard holds {len(gaps)} ids where its counts say {int(sizes.sum())}: recompute the cache.")
    words = varint_decode(q.dictionary)
    n_distinct = int(words[0])
    distinct = _undelta(words[1 : 1 + n_distinct], np.array([n_distinct]))
    ids = distinct[words[1 + n_distinct :]][_undelta(gaps, groups)]
    pos = np.repeat(np.arange(len(sizes)), sizes)
    logits = -(q.dlogit.astype(np.float32) * q.step.astype(np.float32)[pos])
    tail = None
    if q.tail is not None:
        tail = np.where(q.tail == _TAIL_NONE, -np.inf, -(q.tail.astype(np.float32) / np.float32(_TAIL_SCALE))).astype(np.float32)
    return SparseRows(q.head, ids, logits, q.lognorm.astype(np.float32), n_drawn, q.counts.astype(np.int64), tail)


# -- Arrow tables --------------------------------------------------------------------------------
def _binary(data: np.ndarray, row_ends: np.ndarray) -> pa.BinaryArray:
    """One binary value per row: ``data`` (flat bytes) cut at byte offsets ``row_ends`` [rows]."""
    offsets = np.concatenate([[0], row_ends]).astype(np.int32)
    raw = np.ascontiguousarray(data).view(np.uint8)
    return pa.Array.from_buffers(pa.binary(), len(row_ends), [None, pa.py_buffer(offsets), pa.py_buffer(raw.tobytes())])


def _flat(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """A binary column's rows back to back, as ``dtype``."""
    arr = column.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]].view(dtype)


def encode_table(seq_ids: np.ndarray, rows: SparseRows, temperatures: list[float]) -> pa.Table:
    """A cache shard: ``rows`` holds the positions of ``len(seq_ids)`` sequences, the same count each."""
    q = quantise(rows, temperatures)
    n = len(seq_ids)
    per_row = rows.positions // n
    assert per_row * n == rows.positions, f"{rows.positions} positions do not split into {n} rows"
    sizes = rows.sizes()
    row_entries = np.cumsum(sizes.reshape(n, per_row).sum(1))
    entry_bytes = np.concatenate([[0], np.cumsum(q.id_nbytes)])
    row_pos = np.arange(1, n + 1) * per_row
    cols = {
        "seq_id": pa.array(seq_ids, pa.int64()),
        "dictionary": _binary(q.dictionary, np.full(n, len(q.dictionary))),
        "ids": _binary(q.id_bytes, entry_bytes[row_entries]),
        "dlogit": _binary(q.dlogit, row_entries),
        "step": _binary(q.step, row_pos * 2),
        "lognorm": _binary(q.lognorm, row_pos * 2 * len(temperatures)),
    }
    if q.tail is not None:
        cols["tail"] = _binary(q.tail, row_pos * 2 * len(temperatures))
    if rows.n_drawn.any() or rows.head == 0:
        drawn_ends = np.cumsum(rows.n_drawn.reshape(n, per_row).sum(1))
        cols["n_drawn"] = _binary(q.n_drawn, row_pos)
        cols["counts"] = _binary(q.counts, drawn_ends)
    return pa.table(cols)


def table_columns(head: int, drawn: bool) -> tuple[str, ...]:
    """The columns :func:`encode_table` writes for rows with ``head`` exact ids and (``drawn``) draws."""
    return ("seq_id", "dictionary", "ids", "dlogit", "step", "lognorm", *(("tail",) if head else ()),
            *(("n_drawn", "counts") if drawn or head == 0 else ()))


def decode_table(table: pa.Table, head: int, temperatures: list[float]) -> tuple[np.ndarray, SparseRows]:
    """Inverse of :func:`encode_table`: seq_ids int64 [n] and the (dequantised) rows of all positions."""
    n_t = len(temperatures)
    step = _flat(table["step"], np.float16)
    n_pos = len(step)
    names = table.column_names
    n_drawn = _flat(table["n_drawn"], np.uint8) if "n_drawn" in names else np.zeros(n_pos, np.uint8)
    q = Quantised(
        head=head,
        dictionary=_flat(table["dictionary"], np.uint8),
        id_bytes=_flat(table["ids"], np.uint8),
        id_nbytes=np.zeros(0, np.int64),
        n_drawn=n_drawn,
        counts=_flat(table["counts"], np.uint8) if "counts" in names else np.zeros(0, np.uint8),
        dlogit=_flat(table["dlogit"], np.uint8),
        step=step,
        lognorm=_flat(table["lognorm"], np.float16).reshape(n_pos, n_t),
        tail=_flat(table["tail"], np.uint16).reshape(n_pos, n_t) if "tail" in names else None,
    )
    return table["seq_id"].to_numpy(), dequantise(q)


# -- targets at a temperature --------------------------------------------------------------------
def logprobs_at(rows: SparseRows, temperatures: list[float], tau: float) -> np.ndarray:
    """log p_τ at every kept id: float32 [E], for τ one of ``temperatures`` (the columns of ``rows.lse``)."""
    col = temperature_column(temperatures, tau)
    z_ref = np.maximum.reduceat(rows.logits, _group_starts(rows.sizes()))
    pos = np.repeat(np.arange(rows.positions), rows.sizes())
    return ((rows.logits - z_ref[pos]) / np.float32(tau) - (rows.lse[:, col] - z_ref / np.float32(tau))[pos]).astype(np.float32)


def temperature_column(temperatures: list[float], tau: float) -> int:
    """The index of ``tau`` in the temperatures a cache serves; refuses one it does not serve."""
    for i, t in enumerate(temperatures):
        if abs(t - tau) <= 1e-9 * max(1.0, t):
            return i
    raise CacheError(f"this cache serves temperatures {sorted(temperatures)}, not {tau}: train at one of them, "
                     f"or capture again with {tau} in topk.temperatures.")


def padded(rows: SparseRows, values: np.ndarray, width: int, fill) -> np.ndarray:
    """Per-position values [E] (in ``ids`` order) as [N, width], each row left-aligned, rest ``fill``."""
    sizes = rows.sizes()
    if sizes.max(initial=0) > width:
        raise CacheError(f"a position keeps {sizes.max()} ids, more than the cache's {width}: recompute the cache.")
    out = np.full((rows.positions, width), fill, dtype=values.dtype)
    pos = np.repeat(np.arange(rows.positions), sizes)
    rank = np.arange(len(values)) - np.repeat(_group_starts(sizes), sizes)
    out[pos, rank] = values
    return out


@dataclass(frozen=True)
class Drawn:
    mask: np.ndarray  # bool [E]: the entry is a drawn id (not head)
    pos: np.ndarray  # int64 [D]: the position of each drawn entry


def drawn_mask(rows: SparseRows) -> Drawn:
    """Which kept ids were drawn (after each position's head), and their positions."""
    sizes = rows.sizes()
    rank = np.arange(int(sizes.sum())) - np.repeat(_group_starts(sizes), sizes)
    mask = rank >= rows.head
    return Drawn(mask, np.repeat(np.arange(rows.positions), sizes)[mask])


def concat(parts: list[SparseRows]) -> SparseRows:
    """The positions of ``parts`` (same head and temperatures) one after another."""
    tails = [p.tail for p in parts]
    return SparseRows(
        head=parts[0].head,
        ids=np.concatenate([p.ids for p in parts]),
        logits=np.concatenate([p.logits for p in parts]),
        lse=np.concatenate([p.lse for p in parts]),
        n_drawn=np.concatenate([p.n_drawn for p in parts]),
        counts=np.concatenate([p.counts for p in parts]),
        tail=None if tails[0] is None else np.concatenate(tails),
    )
