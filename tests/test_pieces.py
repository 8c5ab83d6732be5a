"""A long text tokenised in pieces gives exactly the ids of the whole text (pieces.py), on Qwen3's
real tokenizer and the tiny one, for texts built to sit on every kind of boundary."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from daemon.inputs.pieces import PieceCutter

# Around a space: letters of several scripts, digits of several kinds, marks, punctuation, other
# whitespace, contractions, added tokens and their look-alikes.
ATOMS = ["a", "Z", "é", "e\u0301", "\u0301", "ß", "漢", "字", "ん", "한", "\u1100\u1161", "ﬁ", "Å", "1", "٣", "½",
         "Ⅻ", "'s", "'T", "'ll", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", ".", ",", "!?", "-",
         "'", '"', "🎉", "\U0001F468\u200d\U0001F469", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>",
         "<|im_end", "|>", "<", "NULL", "word", " word", "Word ", "x1 ", " 2a", "。", "，", "漢字。", "\r", "\x85",
         "\x1c", "\u200d", "\ue000", "\u0bbe", "\u0b95\u0bbe", "\u1100", "\u1161", "\u11a8", "\U00011F04",
         "\U0001E900", "1\n", "a\n\n", ".\n", "!\n ", "\n \n", "\t\n"]
texts = st.lists(st.one_of(st.sampled_from(ATOMS), st.text(max_size=6)), max_size=80).map("".join)


@pytest.fixture(scope="module", params=["tiny", "qwen3"])
def tokenizer(request):
    path = request.getfixturevalue("tiny_dir" if request.param == "tiny" else "qwen3_dir")
    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer


@pytest.fixture(scope="module")
def own(tokenizer) -> PieceCutter:
    """The tokenizer's own cutter (it knows the added tokens); made once, as the daemon does."""
    return PieceCutter.for_tokenizer(tokenizer)


def cutter(own: PieceCutter, size: int) -> PieceCutter:
    return replace(own, piece_chars=size)


def ids(backend, texts: list[str]) -> list[int]:
    return [i for enc in backend.encode_batch(texts, add_special_tokens=False) for i in enc.ids]


def test_both_test_tokenizers_are_cut(tokenizer, own):
    assert PieceCutter.for_tokenizer(tokenizer) is not None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, size=st.integers(1, 12))
def test_pieces_give_the_ids_of_the_whole_text(tokenizer, own, text, size):
    pieces = cutter(own, size).pieces(text)
    assert "".join(pieces) == text
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


def test_a_long_text_is_cut_into_pieces_of_about_the_size(tokenizer, own):
    text = "lorem ipsum dolor sit amet " * 5000
    pieces = cutter(own, 1000).pieces(text)
    assert len(pieces) > 100 and max(map(len, pieces)) < 1100
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


def test_no_cut_falls_inside_an_added_token(tokenizer, own):
    text = "<|im_end|><think>1</think>" * 300
    pieces = cutter(own, 5).pieces(text)
    assert len(pieces) > 50 and all(p.startswith("</think>") for p in pieces[1:])  # cut after the digit only
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


def test_a_text_with_no_allowed_cut_stays_whole(tokenizer, own):
    for text in ["x" * 5000, " " * 5000, "漢字" * 2000, "e\u0301" * 2000, "\n" * 5000, "\n " * 2000]:
        assert cutter(own, 100).pieces(text) == [text]


@pytest.mark.parametrize("text", ["1 " * 5000, "ab\n" * 5000, "漢字。" * 3000, "a.b,c;" * 3000, "x1" * 5000])
def test_digits_line_breaks_and_punctuation_give_cuts_too(tokenizer, own, text):
    pieces = cutter(own, 1000).pieces(text)
    assert len(pieces) > 5 and "".join(pieces) == text
    assert ids(tokenizer, pieces) == ids(tokenizer, [text])


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
