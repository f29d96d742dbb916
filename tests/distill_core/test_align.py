import numpy as np
import pytest

from distill_core.align import align


def spans(*pieces: str) -> np.ndarray:
    """Contiguous spans of consecutive pieces of one text."""
    ends = np.cumsum([len(p) for p in pieces])
    return np.stack([ends - np.array([len(p) for p in pieces]), ends], 1)


def blocks(a):
    return [(list(range(ts, te)), list(range(ss, se)))
            for ts, te, ss, se in zip(a.teacher_start, a.teacher_stop, a.student_start, a.student_stop)]


def test_identical_tokenizations_are_one_to_one():
    t = spans("Hello", " world", "!")
    a = align(t, t)
    assert blocks(a) == [([0], [0]), ([1], [1]), ([2], [2])]
    assert a.student_first.all()


def test_one_to_many_student_token_covers_several_teacher_tokens():
    a = align(spans("un", "believ", "able", " day"), spans("unbelievable", " day"))
    assert blocks(a) == [([0, 1, 2], [0]), ([3], [1])]
    assert list(a.teacher_tokens(0)) == [0, 1, 2]
    assert a.teacher_block.tolist() == [0, 0, 0, 1]


def test_many_to_one_several_student_tokens_under_one_teacher_token():
    a = align(spans("unbelievable", " day"), spans("un", "believ", "able", " day"))
    assert blocks(a) == [([0], [0, 1, 2]), ([1], [3])]
    assert a.student_first.tolist() == [True, False, False, True]
    assert list(a.teacher_tokens(2)) == [0]


def test_many_to_many_without_shared_inner_boundary():
    # "abcd": teacher ab|cd, student a|bcd: only 0 and 4 are shared
    a = align(spans("ab", "cd"), spans("a", "bcd"))
    assert blocks(a) == [([0, 1], [0, 1])]


def test_whitespace_merges():
    # teacher keeps "  " and "x" apart; student merges the spaces into the word, and splits "\n\n"
    text = ["a", "  ", "x", "\n\n"]
    a = align(spans(*text), spans("a", "  x", "\n", "\n"))
    assert blocks(a) == [([0], [0]), ([1, 2], [1]), ([3], [2, 3])]


def test_unicode_bytes_split_by_byte_level_tokens():
    # "é" is 2 UTF-8 bytes; a byte-level teacher splits them, the student keeps the character whole
    text = "café au".encode()
    t = np.array([[0, 3], [3, 4], [4, 5], [5, 8]])  # "caf", b"\xc3", b"\xa9", " au"
    s = np.array([[0, 2], [2, 5], [5, 8]])  # "ca", "fé", " au"
    assert text[2:5].decode() == "fé"
    a = align(t, s)
    assert blocks(a) == [([0, 1, 2], [0, 1]), ([3], [2])]


def test_unaligned_text_only_one_side_covers():
    # the student drops the first byte (a cut character) and the teacher's last token reaches past the student
    t = np.array([[0, 1], [1, 4], [4, 9]])
    s = np.array([[1, 4], [4, 6]])
    a = align(t, s)
    assert a.teacher_block.tolist() == [-1, 0, -1]
    assert a.student_block.tolist() == [0, -1]
    assert blocks(a) == [([1], [0])]
    assert list(a.teacher_tokens(1)) == []


def test_gaps_in_offsets_are_allowed():
    # trimmed offsets: the spaces are in no span on the student side
    t = spans("a", " b", " c")
    s = np.array([[0, 1], [2, 3], [4, 5]])
    a = align(t, s)
    # shared boundaries 0, 1, 3, 5: "a" | " b" (student "b") | " c" (student "c")
    assert blocks(a) == [([0], [0]), ([1], [1]), ([2], [2])]


def test_empty_and_bad_spans():
    a = align(np.zeros((0, 2)), spans("a"))
    assert a.num_blocks == 0 and a.student_block.tolist() == [-1]
    with pytest.raises(ValueError, match="overlap"):
        align(np.array([[0, 3], [2, 4]]), spans("abcd"))
