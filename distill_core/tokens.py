"""What each token id of a tokenizer spells, as bytes: the common ground of two vocabularies.

Distilling across tokenizers compares the two tokenizations of one text by byte spans
(:mod:`distill_core.align`) and matches tokens by the bytes they spell. Supported are the two
families nearly every causal LM uses: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM; each character
of a token stands for one byte) and SentencePiece-style vocabularies with byte fallback (Llama 2,
Mistral; ``▁`` is a space, ``<0xNN>`` one byte). Special tokens spell their own text.
"""

from __future__ import annotations

import json
import re

import numpy as np

from distill_core.errors import TeacherError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Text every supported tokenizer must spell back byte for byte (ASCII, accents, CJK, emoji, spacing).
ROUNDTRIP_TEXT = "The quick brown fox, naïve café 東京 🙂\n\n  def f(x):\treturn x"


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character standing for each byte value, -> that byte.

    Printable Latin-1 bytes stand for themselves; the other 68 byte values (controls, space, ...)
    are given the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _decoder_kinds(tokenizer) -> set[str]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds, todo = set(), [spec]
    while todo:
        d = todo.pop()
        kinds.add(d.get("type"))
        todo.extend(d.get("decoders") or [])
    return kinds


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each id ``0 .. len(tokenizer) - 1`` spells (an id with no token spells ``b""``).

    Raises TeacherError for a tokenizer of neither supported family (module docstring)."""
    kinds = _decoder_kinds(tokenizer) if getattr(tokenizer, "backend_tokenizer", None) is not None else set()
    byte_level = "ByteLevel" in kinds
    if not byte_level and not kinds & {"ByteFallback", "Metaspace", "Replace"}:
        raise TeacherError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} is neither byte-level BPE nor "
            f"SentencePiece-style (decoder kinds {sorted(k for k in kinds if k)}): distilling across tokenizers needs the "
            "bytes each token spells; use a student tokenizer of one of those families."
        )
    alphabet = byte_level_alphabet()
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    out = [b""] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i >= len(out):
            continue
        if token in added:
            out[i] = token.encode()
        elif byte_level:
            out[i] = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode()
        elif (m := _BYTE_TOKEN.match(token)) is not None:
            out[i] = bytes([int(m.group(1), 16)])
        else:
            out[i] = token.replace("\u2581", " ").encode()
    return out


def shared_tokens(source: list[bytes], target: list[bytes]) -> np.ndarray:
    """int64 [len(source)]: for each source id, the target id spelling the same bytes (the lowest such
    id), or -1 where the target vocabulary has no such token (and for ids spelling nothing)."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(target):
        if b:
            index.setdefault(b, i)
    return np.array([index.get(b, -1) if b else -1 for b in source], dtype=np.int64)


def spell(text: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    """``text`` as a sequence of ids of ``index`` (bytes -> id), longest match first from the left;
    None when some byte cannot be spelled. ``longest`` is the longest key of ``index``."""
    ids, at = [], 0
    while at < len(text):
        for n in range(min(longest, len(text) - at), 0, -1):
            if (i := index.get(text[at : at + n])) is not None:
                ids.append(i)
                at += n
                break
        else:
            return None
    return ids


def spans_of(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Byte spans [N, 2] of tokens ``ids`` [N] laid end to end, from each id's byte length ``lengths`` [V]."""
    ends = np.cumsum(lengths[np.asarray(ids, dtype=np.int64)])
    return np.stack([ends - lengths[ids], ends], 1)


def check_roundtrip(tokenizer, table: list[bytes], what: str) -> None:
    """Raise TeacherError unless the tokens of :data:`ROUNDTRIP_TEXT` spell it back byte for byte."""
    ids = tokenizer(ROUNDTRIP_TEXT, add_special_tokens=False)["input_ids"]
    spelled = b"".join(table[i] for i in ids)
    if spelled != ROUNDTRIP_TEXT.encode():
        raise TeacherError(
            f"{what}: its tokens spell {spelled[:60]!r} for {ROUNDTRIP_TEXT.encode()[:60]!r} (normalisation or an added "
            "prefix space change the text), so the two tokenizations cannot be aligned byte for byte: use a tokenizer "
            "without normalisation, or distil with the teacher's tokenizer."
        )
