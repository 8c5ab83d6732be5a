"""Cut a long text where Qwen's tokenizer would cut it anyway, so that it is tokenised in pieces.

Why: tokenising a text of a million characters makes one encoding of ~a million tokens, and freeing
it holds the GIL throughout (a string per token: ~70 ms per million characters here, ~150 ms for a
reranker pair of two), which stalls the socket loop. Pieces of a few thousand characters, freed one
at a time, hold it for a millisecond or two each, and give the same ids.

Exact, not approximate: the ids of the pieces, concatenated, are the ids of the whole text, because
a cut is made only at a space with a letter or digit before it and a letter after it. There,
- Qwen's pre-tokenizer regex (`SPLIT_REGEX`, its "isolated" split) ends a match at the letter or
  digit before the space (no alternative matches across a space from the left) and starts the next
  one at the space (` ?\\p{L}+`-like alternatives look only forward), so the pre-tokens on each
  side are the same whether or not the text goes on;
- NFC never composes a space with its neighbours, so normalising the pieces is normalising the text;
- no added token contains a space, so none is split, and the byte-level BPE works per pre-token.
`PieceCutter.for_tokenizer` checks those premises on the tokenizer's own configuration and gives no
cutter when any differs; the tests compare pieces with whole texts on Qwen3's real tokenizer.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

SPLIT_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PIECE_CHARS = 16_384  # about this many characters a piece: ~1-2 ms of GIL to free its encoding


@dataclass(frozen=True)
class PieceCutter:
    piece_chars: int = PIECE_CHARS

    @classmethod
    def for_tokenizer(cls, backend, piece_chars: int = PIECE_CHARS) -> "PieceCutter | None":
        """A cutter for this Rust tokenizer, or None unless it is configured as Qwen's is."""
        config = json.loads(backend.to_str())
        if config.get("normalizer") not in (None, {"type": "NFC"}) or config.get("truncation") or config.get("padding"):
            return None
        if config.get("model", {}).get("type") != "BPE" or not _qwen_pre_tokenizer(config.get("pre_tokenizer")):
            return None
        for token in config.get("added_tokens", ()):
            if any(c.isspace() for c in token["content"]) or token.get("lstrip") or token.get("rstrip") \
                    or token.get("single_word") or token.get("normalized"):
                return None
        return cls(piece_chars)

    def pieces(self, text: str) -> list[str]:
        """`text` in pieces of about `piece_chars` (longer where no cut is allowed), in order."""
        if len(text) <= self.piece_chars:
            return [text]
        out, start, at = [], 0, self.piece_chars
        while (cut := _next_cut(text, at)) is not None:
            out.append(text[start:cut])
            start, at = cut, cut + self.piece_chars
        out.append(text[start:])
        return out


def _next_cut(text: str, at: int) -> int | None:
    """The first position from `at` of a space with a letter or digit before it and a letter after."""
    i = text.find(" ", max(at, 1))
    while i != -1 and i + 1 < len(text):
        if unicodedata.category(text[i - 1])[0] in "LN" and unicodedata.category(text[i + 1])[0] == "L":
            return i
        i = text.find(" ", i + 1)
    return None


def _qwen_pre_tokenizer(pre: object) -> bool:
    """Qwen2/Qwen3's: the split regex (isolated), then byte-level without a regex or a prefix space."""
    if not isinstance(pre, dict) or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", ())) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split == {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex"))
