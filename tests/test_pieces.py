"""A long text tokenised in pieces gives exactly the ids of the whole text (pieces.py), on Qwen3's
real tokenizer and the tiny one, for texts built to sit on every kind of boundary."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from daemon.pieces import PieceCutter

# Around a space: letters of several scripts, digits of several kinds, marks, punctuation, other
# whitespace, contractions, added tokens and their look-alikes.
ATOMS = ["a", "Z", "é", "e\u0301", "\u0301", "ß", "漢", "字", "ん", "한", "\u1100\u1161", "ﬁ", "Å", "1", "٣", "½",
         "Ⅻ", "'s", "'T", "'ll", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", ".", ",", "!?", "-",
         "'", '"', "🎉", "\U0001F468\u200d\U0001F469", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>",
         "<|im_end", "|>", "<", "NULL", "word", " word", "Word ", "x1 ", " 2a"]
texts = st.lists(st.one_of(st.sampled_from(ATOMS), st.text(max_size=6)), max_size=80).map("".join)


@pytest.fixture(scope="module", params=["tiny", "qwen3"])
def tokenizer(request):
    path = request.getfixturevalue("tiny_dir" if request.param == "tiny" else "qwen3_dir")
    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer


def ids(backend, texts: list[str]) -> list[int]:
    return [i for enc in backend.encode_batch(texts, add_special_tokens=False) for i in enc.ids]


def test_both_test_tokenizers_are_cut(tokenizer):
    assert PieceCutter.for_tokenizer(tokenizer) is not None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, size=st.integers(1, 12))
def test_pieces_give_the_ids_of_the_whole_text(tokenizer, text, size):
    pieces = PieceCutter(piece_chars=size).pieces(text)
    assert "".join(pieces) == text
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


def test_a_long_text_is_cut_into_pieces_of_about_the_size(tokenizer):
    text = "lorem ipsum dolor sit amet " * 5000
    pieces = PieceCutter(piece_chars=1000).pieces(text)
    assert len(pieces) > 100 and max(map(len, pieces)) < 1100
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


def test_a_text_with_no_allowed_cut_stays_whole(tokenizer):
    for text in ["x" * 5000, " " * 5000, "a. " * 2000, "1 " * 2000]:
        assert PieceCutter(piece_chars=100).pieces(text) == [text]


@pytest.mark.parametrize("change", [
    {"normalizer": {"type": "NFKC"}},
    {"pre_tokenizer": {"type": "Whitespace"}},
    {"added_tokens": [{"id": 0, "content": "two words", "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True}]},
    {"added_tokens": [{"id": 0, "content": "<x>", "single_word": False, "lstrip": True, "rstrip": False,
                       "normalized": False, "special": True}]},
])
def test_a_tokenizer_configured_otherwise_is_never_cut(tokenizer, change):
    from tokenizers import Tokenizer

    config = {**json.loads(tokenizer.to_str()), **change}
    assert PieceCutter.for_tokenizer(Tokenizer.from_str(json.dumps(config))) is None
