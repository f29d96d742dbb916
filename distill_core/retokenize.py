"""The teacher's token rows as the same text in the student's tokens, with soft targets carried across.

The prepared data and every teacher cache keep the teacher's token ids. For a student with its own
tokenizer (``student.tokenizer``) each packed teacher row is spelled out as bytes
(:func:`distill_core.tokens.token_bytes`), cut at the teacher's special tokens (each becomes the
student's EOS), and every piece of text is tokenised by the student; the byte spans of both
tokenizations are aligned (:mod:`distill_core.align`). A character cut at a row's edge (bytes of one
UTF-8 character split between two packed rows) is left out of the student's text.

Soft targets at student positions (:func:`student_targets`), for the student token ``s`` a position
predicts, in block ``b`` (its teacher tokens ``t_1..t_n``, its student tokens ``s_1..s_m``):
  * ``s`` is the block's first student token (``s = s_1``): its context ends where the teacher's
    context before ``t_1`` ends, so the teacher's top-k predicting ``t_1`` is the target, each teacher
    id mapped to the student id spelling the same bytes; teacher ids with no such student token join
    the tail (exact-match part). When the block is not one-to-one, the student's actual token gets the
    teacher's *chained* log-probability ``log p(t_1) + ... + log p(t_n)`` (a student token covering
    several teacher tokens), divided by ``m`` (several student tokens under one teacher token *share*
    it: the m of them together get the teacher's probability).
  * ``s`` is a later token of the block: no teacher distribution has its context; the target is only
    the actual token at that shared chained log-probability, the rest of the mass in the tail.
  * ``s`` in no block (unaligned), or in the row's first block (no teacher prediction): no target.
The log-probability of an actual teacher token outside the teacher's top-k is not stored; the tail
log-probability (an upper bound) stands in for it.
The Universal Logit Distillation term (``uld``) takes, at first positions, the teacher's own sorted
top-k (no mapping needed) and elsewhere the same one-token target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill_core.align import Alignment, align
from distill_core.errors import DataError
from distill_core.teacher.samples_cache import SOFT_COLUMNS
from distill_core.tokens import shared_tokens, token_bytes


@dataclass(frozen=True)
class Retokenized:
    """One teacher row in the student's tokens: ids int64 [Ns], their byte spans int64 [Ns, 2] in the
    teacher row's bytes, and the alignment to the teacher row."""

    ids: np.ndarray
    spans: np.ndarray
    alignment: Alignment


class Retokenizer:
    """Turns teacher token rows into student token rows (module docstring). ``max_len`` caps the
    student row (the student's context); text past it is dropped."""

    def __init__(self, teacher_tokenizer, student_tokenizer, max_len: int | None = None):
        self.t_table, self.s_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
        self.t_len = np.array([len(b) for b in self.t_table], dtype=np.int64)
        self.s_len = np.array([len(b) for b in self.s_table], dtype=np.int64)
        self.t_special = np.zeros(len(self.t_table), dtype=bool)
        self.t_special[[i for i in teacher_tokenizer.added_tokens_decoder if i < len(self.t_table)]] = True
        self.teacher_to_student = shared_tokens(self.t_table, self.s_table)
        self.student = student_tokenizer
        self.eos = student_tokenizer.eos_token_id
        self.max_len = max_len

    def rows(self, teacher_rows: list[np.ndarray]) -> list[Retokenized]:
        """Each teacher row (int [Nt]) as a student row; one tokenizer call for all their pieces of text."""
        pieces, layout = [], []  # layout per row: (byte start, byte end, text index or -1 for a special token)
        for ids in teacher_rows:
            ids = np.asarray(ids, dtype=np.int64)
            ends = np.cumsum(self.t_len[ids])
            starts = ends - self.t_len[ids]
            row = []
            special = np.flatnonzero(self.t_special[ids])
            cuts = [-1, *special.tolist(), len(ids)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                lo, hi = (ends[a] if a >= 0 else 0), (starts[b] if b < len(ids) else (ends[-1] if len(ids) else 0))
                if hi > lo:
                    text = b"".join(self.t_table[i] for i in ids[a + 1 : b])
                    lo, hi, text = _whole_characters(lo, hi, text, first=a < 0, last=b == len(ids))
                    if text:
                        row.append((lo, hi, len(pieces)))
                        pieces.append(text)
                if b < len(ids):
                    row.append((int(starts[b]), int(ends[b]), -1))
            layout.append(row)
        encoded = self.student(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        out = []
        for ids, row in zip(teacher_rows, layout):
            s_ids, s_spans = [], []
            for lo, hi, k in row:
                if k < 0:
                    s_ids.append(np.array([self.eos]))
                    s_spans.append(np.array([[lo, hi]]))
                    continue
                piece = np.asarray(encoded[k], dtype=np.int64)
                ends = lo + np.cumsum(self.s_len[piece])
                if len(piece) and ends[-1] != hi:
                    raise DataError(
                        f"the student tokenizer spells {pieces[k][:40]!r}... as {ends[-1] - lo} bytes, not {hi - lo}: it changes "
                        "the text (normalisation), so it cannot be aligned with the teacher's tokens; use another student.tokenizer."
                    )
                s_ids.append(piece)
                s_spans.append(np.stack([ends - self.s_len[piece], ends], 1))
            s_ids = np.concatenate(s_ids) if s_ids else np.zeros(0, dtype=np.int64)
            s_spans = np.concatenate(s_spans) if s_spans else np.zeros((0, 2), dtype=np.int64)
            if self.max_len is not None:
                s_ids, s_spans = s_ids[: self.max_len], s_spans[: self.max_len]
            ids = np.asarray(ids, dtype=np.int64)
            t_ends = np.cumsum(self.t_len[ids])
            out.append(Retokenized(s_ids, s_spans, align(np.stack([t_ends - self.t_len[ids], t_ends], 1), s_spans)))
        return out


    def collate_data(self, rows: list[dict[str, np.ndarray]], pad_id: int):
        """A data Batch in the student's tokens from teacher rows (input_ids [Nt], optional top-k
        over its positions): CE on every student token, soft targets where :func:`student_targets` gives them."""
        student = self.rows([r["input_ids"] for r in rows])
        input_ids, mask = _student_batch(student, pad_id)
        for i, r in enumerate(student):
            mask[i, : max(len(r.ids) - 1, 0)] = True
        if "topk_ids" not in rows[0]:
            return _batch(input_ids, mask)
        got = [student_targets(r, row["input_ids"], row["topk_ids"], row["topk_logprobs"], row["tail_logprob"], self.teacher_to_student)
               for r, row in zip(student, rows)]
        return _batch(input_ids, mask, got, rows[0]["topk_ids"].shape[-1])

    def _text_completion(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``row`` with its completion (and the soft targets over it) cut before the first byte that is
        not UTF-8 text: a generated completion may spell any bytes (a byte-level teacher can write half a
        character, or none), and the student's tokenizer reads text."""
        ids = np.concatenate([row["prompt_ids"], row["completion_ids"]]).astype(np.int64)
        try:
            b"".join(self.t_table[i] for i in ids).decode("utf-8")
            return row
        except UnicodeDecodeError as e:
            valid = e.start
        ends = np.cumsum(self.t_len[ids])[len(row["prompt_ids"]):]
        keep = int((ends <= valid).sum())
        return {**row, **{name: row[name][:keep] for name in ("completion_ids", *SOFT_COLUMNS) if name in row}}

    def collate_samples(self, rows: list[dict[str, np.ndarray]], pad_id: int):
        """Teacher samples (prompt_ids, completion_ids in teacher tokens) as student rows: the loss on
        the student tokens that end inside the completion's text (sequence-level KD on text), cut before
        its first byte that is not UTF-8 text. Soft targets stored with the samples (``samples.soft_topk``:
        the teacher's top-k at each completion position) are carried across as for data
        (:func:`student_targets`), at the student positions whose block lies in the completion."""
        import torch

        rows = [self._text_completion(r) for r in rows]
        teacher_rows = [np.concatenate([r["prompt_ids"], r["completion_ids"]]).astype(np.int64) for r in rows]
        student = self.rows(teacher_rows)
        input_ids, mask = _student_batch(student, pad_id)
        for i, (r, row) in enumerate(zip(student, rows)):
            prompt_bytes = int(self.t_len[np.asarray(row["prompt_ids"], dtype=np.int64)].sum())
            mask[i, : max(len(r.ids) - 1, 0)] = torch.from_numpy(r.spans[1:, 1] > prompt_bytes)
        if "topk_ids" not in rows[0]:
            return _batch(input_ids, mask)
        k, got = rows[0]["topk_ids"].shape[-1], []
        for r, row, ids in zip(student, rows, teacher_rows):
            p, c = len(row["prompt_ids"]), len(row["completion_ids"])
            # the row's top-k over its p + c - 1 positions: the completion's stored, the prompt's all tail
            top, lps, tail = np.zeros((p + c - 1, k), np.int64), np.full((p + c - 1, k), -np.inf, np.float32), np.zeros(p + c - 1, np.float32)
            top[p - 1 :], lps[p - 1 :], tail[p - 1 :] = row["topk_ids"], row["topk_logprobs"], row["tail_logprob"]
            targets = student_targets(r, ids, top, lps, tail, self.teacher_to_student)
            block = r.alignment.student_block[1 : len(r.ids)]
            in_completion = (block >= 0) & (r.alignment.teacher_start[np.maximum(block, 0)] >= p)
            targets["soft"] &= in_completion
            targets["uld"] &= in_completion
            got.append(targets)
        return _batch(input_ids, mask, got, k)


def _student_batch(student: list[Retokenized], pad_id: int):
    """(input_ids int64 [B, L] right-padded with ``pad_id``, an all-False loss mask bool [B, L-1]) of student rows."""
    import torch

    length = max(max(len(r.ids) for r in student), 2)
    input_ids = torch.full((len(student), length), pad_id, dtype=torch.long)
    for i, r in enumerate(student):
        input_ids[i, : len(r.ids)] = torch.from_numpy(r.ids)
    return input_ids, torch.zeros(len(student), length - 1, dtype=torch.bool)


def _batch(input_ids, mask, got: list[dict[str, np.ndarray]] | None = None, k: int = 0):
    """A Batch of student rows; with ``got`` (each row's :func:`student_targets`) its exact-match and ULD
    targets, masked to the positions that have them and to the loss mask."""
    import torch

    from distill_core.batches import Batch
    from distill_core.losses.signals import TopKTargets

    if got is None:
        return Batch(input_ids, mask)
    shape = tuple(mask.shape)
    arrays = {"topk_ids": np.zeros((*shape, k), np.int64), "topk_logprobs": np.full((*shape, k), -np.inf, np.float32),
              "valid": np.zeros((*shape, k), bool), "tail_logprob": np.zeros(shape, np.float32),
              "uld_logprobs": np.full((*shape, k), -np.inf, np.float32), "uld_tail": np.zeros(shape, np.float32),
              "soft": np.zeros(shape, bool), "uld": np.zeros(shape, bool)}
    arrays["valid"][..., 0] = True  # padding: all teacher mass in the tail, slot 0 valid at zero probability
    for i, targets in enumerate(got):
        for name, value in targets.items():
            arrays[name][i, : len(value)] = value
    t = {name: torch.from_numpy(value) for name, value in arrays.items()}
    return Batch(input_ids, mask, TopKTargets(t["topk_ids"], t["topk_logprobs"], t["tail_logprob"], t["valid"]), t["soft"] & mask,
                 TopKTargets(t["topk_ids"], t["uld_logprobs"], t["uld_tail"]), t["uld"] & mask)


def _whole_characters(lo: int, hi: int, text: bytes, *, first: bool, last: bool) -> tuple[int, int, str]:
    """The piece's text without the bytes of a character cut at the row's start or end (first/last piece)."""
    head = 0
    if first:
        while head < min(3, len(text)) and text[head] & 0xC0 == 0x80:  # continuation bytes of a cut character
            head += 1
    tail = len(text)
    if last:
        for back in range(1, min(4, len(text) - head) + 1):
            byte = text[tail - back]
            if byte & 0xC0 == 0xC0:  # the lead byte of the last character: keep it only when complete
                need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                if back < need:
                    tail -= back
                break
            if byte < 0x80:
                break
    try:
        return lo + head, lo + tail, text[head:tail].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"teacher tokens spell bytes that are not UTF-8 text ({e}): the prepared data is not text.") from None


def _actual_logprobs(teacher_ids: np.ndarray, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """float32 [Nt]: the teacher's log-probability of each actual token (position t-1's top-k at id
    teacher_ids[t]; the tail log-probability where it is not there; 0 for the row's first token)."""
    out = np.zeros(len(teacher_ids), dtype=np.float32)
    nxt = teacher_ids[1 : len(ids) + 1]
    hit = ids[: len(nxt)] == nxt[:, None]
    found = hit.any(-1)
    out[1 : len(nxt) + 1] = np.where(found, lps[np.arange(len(nxt)), hit.argmax(-1)], tail[: len(nxt)])
    return out


def student_targets(r: Retokenized, teacher_ids: np.ndarray, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray,
                    teacher_to_student: np.ndarray) -> dict[str, np.ndarray]:
    """Soft targets at the student positions of one row (module docstring for the rule).

    r: the row in student tokens; teacher_ids int [Nt]; the teacher's top-k over its Nt-1 positions:
    ids int64 [Nt-1, k], lps float32 [Nt-1, k], tail float32 [Nt-1]; teacher_to_student int64 [Vt].
    Returns, over the Ns-1 student positions: topk_ids int64 [Ns-1, k], topk_logprobs float32, valid bool
    [Ns-1, k], tail_logprob float32 [Ns-1] (exact-match targets in student ids); uld_logprobs float32
    [Ns-1, k] sorted descending and uld_tail float32 [Ns-1] (the ULD targets); soft, uld bool [Ns-1]: the
    positions that have an exact-match target, and a ULD target."""
    a, n, k = r.alignment, max(len(r.ids) - 1, 0), ids.shape[1]
    teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
    block = a.student_block[1 : n + 1]
    first = a.student_first[1 : n + 1]
    t_first = np.where(block >= 0, a.teacher_start[np.maximum(block, 0)], 0)
    soft = (block >= 0) & (t_first >= 1) & (t_first - 1 < len(ids))
    tp = np.clip(t_first - 1, 0, max(len(ids) - 1, 0))  # the teacher position predicting the block's first token
    # the shared chained log-probability of each block's actual tokens
    actual = _actual_logprobs(teacher_ids, ids, lps, tail)
    csum = np.concatenate([[0.0], np.cumsum(actual, dtype=np.float64)])
    chain = (csum[a.teacher_stop] - csum[a.teacher_start]) / (a.student_stop - a.student_start)
    one_to_one = (a.teacher_stop - a.teacher_start == 1) & (a.student_stop - a.student_start == 1)
    shared = np.where(block >= 0, chain[np.maximum(block, 0)], 0.0).astype(np.float32)
    plain = np.where(block >= 0, one_to_one[np.maximum(block, 0)], True)
    nxt = r.ids[1 : n + 1]

    out_ids = teacher_to_student[ids[tp]] if len(ids) else np.zeros((n, k), dtype=np.int64)
    valid = out_ids >= 0
    out_lps = np.where(valid, lps[tp], -np.inf).astype(np.float32) if len(ids) else np.full((n, k), -np.inf, np.float32)
    out_tail = tail[tp].copy() if len(ids) else np.zeros(n, np.float32)
    lost = ~valid.all(-1)
    out_tail[lost] = np.logaddexp(out_tail[lost], _logsumexp(np.where(valid, -np.inf, lps[tp])[lost]))
    uld_lps, uld_tail = (lps[tp].copy(), tail[tp].copy()) if len(ids) else (out_lps.copy(), out_tail.copy())

    # first tokens of blocks that are not one-to-one: the actual token takes the shared chained log-probability
    fix = np.flatnonzero(first & ~plain & soft)
    for j in fix:
        row_ids, row_valid = out_ids[j], valid[j]
        # its own slot if the teacher's top-k has it, else a slot of an unmatched id, else the least likely one
        slot = [*np.flatnonzero(row_valid & (row_ids == nxt[j])), *np.flatnonzero(~row_valid), k - 1][0]
        row_ids[slot], row_valid[slot], out_lps[j, slot] = nxt[j], True, shared[j]
        out_tail[j] = _rest(out_lps[j])
    # later tokens of a block: only the actual token, at the shared chained log-probability
    later = np.flatnonzero(~first & soft)
    out_ids[later] = nxt[later, None]
    valid[later] = False
    valid[later, 0] = True
    out_lps[later] = -np.inf
    out_lps[later, 0] = shared[later]
    out_tail[later] = [_rest(out_lps[j]) for j in later]
    uld_lps[later], uld_tail[later] = out_lps[later], out_tail[later]
    # a position with no valid slot (no teacher id of its top-k in the student's vocabulary) has no
    # exact-match target, only the ULD one; slot 0 stays valid at zero probability to keep the math finite
    none = ~valid.any(-1)
    uld = soft.copy()
    soft &= ~none
    valid[none, 0] = True
    out_ids[none, 0] = 0
    out_ids = np.where(valid, out_ids, out_ids[np.arange(n), valid.argmax(-1)][:, None])  # invalid slots repeat a valid id
    return {"topk_ids": out_ids.astype(np.int64), "topk_logprobs": out_lps, "valid": valid, "tail_logprob": out_tail.astype(np.float32),
            "uld_logprobs": -np.sort(-uld_lps, -1).astype(np.float32), "uld_tail": uld_tail.astype(np.float32), "soft": soft, "uld": uld}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - m).sum(-1)) + m[..., 0]).astype(np.float32)


def _rest(lps: np.ndarray) -> np.float32:
    """log(1 − Σ exp(lps)) clamped at a mass of 0 (in place: renormalises ``lps`` when they hold more than 1)."""
    total = float(np.exp(lps[np.isfinite(lps)].astype(np.float64)).sum())
    if total >= 1.0:
        lps -= np.float32(np.log(total))
        return np.float32(-np.inf)
    return np.float32(np.log1p(-total))
