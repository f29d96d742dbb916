import numpy as np
import pytest

from distill_core.errors import TeacherError
from distill_core.tokens import ROUNDTRIP_TEXT, byte_level_alphabet, check_roundtrip, shared_tokens, spans_of, spell, token_bytes


def test_byte_level_alphabet_covers_every_byte_once():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_token_bytes_spell_the_text_back(tiny_tokenizer, small_tokenizer):
    for tok in (tiny_tokenizer, small_tokenizer):
        table = token_bytes(tok)
        assert len(table) == len(tok) and table[0] == b"<|endoftext|>"
        check_roundtrip(tok, table, "tiny")
        ids = tok(ROUNDTRIP_TEXT, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(b) for b in table])
        spans = spans_of(np.array(ids), lengths)
        assert spans[-1, 1] == len(ROUNDTRIP_TEXT.encode())
        assert all(ROUNDTRIP_TEXT.encode()[a:b] == table[i] for (a, b), i in zip(spans, ids))


def test_sentencepiece_style_tokens():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁the": 1, "<0xE2>": 2, "cat": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    table = token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))
    assert table == [b"<unk>", b" the", b"\xe2", b"cat"]

    plain = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    with pytest.raises(TeacherError, match="neither byte-level BPE nor SentencePiece-style"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="<unk>"))


def test_shared_tokens_and_spelling():
    source = [b"<s>", b"ab", b"c", b"", b"abc"]
    target = [b"c", b"ab", b"a", b"b"]
    assert shared_tokens(source, target).tolist() == [-1, 1, 0, -1, -1]
    index = {b: i for i, b in enumerate(target)}
    assert spell(b"abc", index, 2) == [1, 0]  # longest match first: "ab" + "c"
    assert spell(b"bab", index, 2) == [3, 1]
    assert spell(b"abx", index, 2) is None
