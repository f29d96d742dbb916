"""Align two tokenizations of the same text by their character (or byte) spans.

Each tokenization is given as spans ``[N, 2]`` (start, end) into one text, in order and not
overlapping, as a tokenizer's offset mapping gives them. A *boundary* is any span start or end; the
boundaries both tokenizations share cut the text into *blocks*, the smallest pieces on which the two
agree. A block holds one or more teacher tokens and one or more student tokens:

    1 teacher : 1 student   the same piece of text (the token strings coincide)
    n teacher : 1 student   the student token covers several teacher tokens (one-to-many)
    1 teacher : m student   several student tokens lie under one teacher token (many-to-one)
    n : m                   both split the piece, at no shared boundary inside it

A token is *unaligned* (block ``-1``) when the piece of text it lies in is not covered by the other
tokenization at all (text one side dropped, e.g. a character cut at the edge of a packed row), or
when it reaches past the last shared boundary. Only the first student token of a block is predicted
from a context that ends where a teacher token's context ends: the text before the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """Blocks of text on which two tokenizations agree.

    teacher_block: int64 [Nt], the block of each teacher token, -1 for unaligned ones.
    student_block: int64 [Ns], the block of each student token, -1 for unaligned ones.
    teacher_start, teacher_stop: int64 [Nb], the block's teacher tokens are ``teacher_start:teacher_stop``.
    student_start, student_stop: int64 [Nb], likewise for its student tokens.
    Blocks are numbered in text order.
    """

    teacher_block: np.ndarray
    student_block: np.ndarray
    teacher_start: np.ndarray
    teacher_stop: np.ndarray
    student_start: np.ndarray
    student_stop: np.ndarray

    @property
    def num_blocks(self) -> int:
        return len(self.teacher_start)

    def teacher_tokens(self, student_token: int) -> range:
        """The teacher tokens of the block student token ``student_token`` lies in (empty when unaligned)."""
        b = int(self.student_block[student_token])
        return range(0) if b < 0 else range(int(self.teacher_start[b]), int(self.teacher_stop[b]))

    @property
    def student_first(self) -> np.ndarray:
        """bool [Ns]: the student token is the first of its block (its context ends on a shared boundary)."""
        first = np.zeros(len(self.student_block), dtype=bool)
        first[self.student_start] = True
        return first


def align(teacher: np.ndarray, student: np.ndarray) -> Alignment:
    """Align teacher spans [Nt, 2] and student spans [Ns, 2] (start, end; int) over the same text.

    Spans must be sorted and must not overlap; gaps between them are allowed (text a tokenizer's
    offsets leave out). Returns the :class:`Alignment`. Vectorised: O((Nt + Ns) log(Nt + Ns)).
    """
    teacher, student = _spans(teacher, "teacher"), _spans(student, "student")
    shared = np.intersect1d(np.unique(teacher), np.unique(student))
    t_block, s_block = _block_of(teacher, shared), _block_of(student, shared)
    # A block is kept when both sides have a token in it; number the kept ones 0, 1, ...
    has = np.zeros((2, max(len(shared), 1)), dtype=bool)
    has[0, t_block[t_block >= 0]] = True
    has[1, s_block[s_block >= 0]] = True
    kept = has.all(0)
    number = np.where(kept, np.cumsum(kept) - 1, -1)
    t_block = np.where(t_block >= 0, number[np.maximum(t_block, 0)], -1)
    s_block = np.where(s_block >= 0, number[np.maximum(s_block, 0)], -1)
    t_start, t_stop = _ranges(t_block, int(kept.sum()))
    s_start, s_stop = _ranges(s_block, int(kept.sum()))
    return Alignment(t_block, s_block, t_start, t_stop, s_start, s_stop)


def _spans(spans: np.ndarray, what: str) -> np.ndarray:
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans):
        if (spans[:, 1] < spans[:, 0]).any():
            raise ValueError(f"{what} spans must have end >= start")
        if (spans[1:, 0] < spans[:-1, 1]).any():
            raise ValueError(f"{what} spans must be sorted and must not overlap")
    return spans


def _block_of(spans: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """The index m of the shared boundaries [shared[m], shared[m+1]) holding each span, -1 where none does."""
    m = np.searchsorted(shared, spans[:, 0], side="right") - 1
    inside = (m >= 0) & (m + 1 < len(shared))
    closes = np.zeros(len(spans), dtype=bool)
    closes[inside] = spans[inside, 1] <= shared[m[inside] + 1]
    # A zero-length span sitting on a shared boundary belongs to no piece of text.
    return np.where(inside & closes & (spans[:, 1] > spans[:, 0]), m, -1)


def _ranges(block: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last token index of each block 0..n-1 (each block's tokens are one run,
    as tokens come in text order); every block has at least one token."""
    idx = np.flatnonzero(block >= 0)
    b = block[idx]
    _, first = np.unique(b, return_index=True)
    _, last = np.unique(b[::-1], return_index=True)
    assert len(first) == n, (len(first), n)
    return idx[first], idx[len(idx) - 1 - last] + 1
