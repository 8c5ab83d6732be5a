r"""Cut a long text where Qwen's tokenizer would cut it anyway, so that it is tokenised in pieces.

Why: tokenising a text of a million characters makes one encoding of ~a million tokens, and freeing
it holds the GIL throughout (a string per token: ~70 ms per million characters here, ~150 ms for a
reranker pair of two), which stalls the socket loop. Pieces of a few thousand characters, freed one
at a time, hold it for a millisecond or two each, and give the same ids.

Exact, not approximate: the ids of the pieces, concatenated, are the ids of the whole text, because
a cut is made only where Qwen's pre-tokenizer regex (`SPLIT_REGEX`, an "isolated" split) ends one
match and starts the next whatever follows, and no later step joins across it:
- after a digit (every `\p{N}` is a match of its own);
- after a letter, before a character that is not one (`\p{L}+` and the contractions end there);
- before a space that follows a letter, digit, mark, punctuation or symbol (no alternative runs on
  from such a character into a space; a whitespace run before the cut could, so none is allowed);
- after a line break, before a character that is not whitespace (`\s*[\r\n]+` ends there);
each alternative looks only forward from where it starts (the one lookahead, `\s+(?!\S)`, only
from whitespace). The character after a cut is never a combining mark, so NFC composes nothing
across it (the other starters that compose, Hangul vowel and final jamo, are letters after a
letter); both characters must be assigned in Python's Unicode database, so that a letter too new for
it is not misread. No cut falls inside an added token (the text is split at them first). `PieceCutter.for_tokenizer`
checks those premises on the tokenizer's own configuration and gives no cutter when any differs; the
tests compare pieces with whole texts on Qwen3's real tokenizer. A text with no such place (a run of
letters with no space or punctuation, as some CJK text is) is tokenised whole.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

import regex

SPLIT_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PIECE_CHARS = 16_384  # about this many characters a piece: ~1-2 ms of GIL to free its encoding


@dataclass(frozen=True)
class PieceCutter:
    piece_chars: int = PIECE_CHARS
    added: tuple[str, ...] = ()  # the tokenizer's added tokens: the text is split at them first, never cut in one

    @classmethod
    def for_tokenizer(cls, backend, piece_chars: int = PIECE_CHARS) -> "PieceCutter | None":
        """A cutter for this Rust tokenizer, or None unless it is configured as Qwen's is. Reads the
        components' own settings (serialising the whole tokenizer, its vocabulary included, took
        a third of a second per model at start)."""
        if _settings(backend.normalizer) not in (None, {"type": "NFC"}) or backend.truncation or backend.padding:
            return None
        if type(backend.model).__name__ != "BPE" or not _qwen_pre_tokenizer(_settings(backend.pre_tokenizer)):
            return None
        added = list(backend.get_added_tokens_decoder().values())
        for token in added:
            if any(c.isspace() for c in token.content) or token.lstrip or token.rstrip or token.single_word \
                    or token.normalized:
                return None
        return cls(piece_chars, tuple(token.content for token in added))

    def pieces(self, text: str) -> list[str]:
        """`text` in pieces of about `piece_chars` (longer where no cut is allowed), in order."""
        if len(text) <= self.piece_chars:
            return [text]
        out, start, at = [], 0, self.piece_chars
        while (cut := self._next_cut(text, at)) is not None:
            out.append(text[start:cut])
            start, at = cut, cut + self.piece_chars
        out.append(text[start:])
        return out

    def _next_cut(self, text: str, at: int) -> int | None:
        """The first allowed cut at or after `at` (never at 0 or at the end)."""
        pos = max(at, 1)
        while (found := _CANDIDATE.search(text, pos, concurrent=True)) is not None:
            i = found.start()
            if i < len(text) and _allowed(text[i - 1], text[i]) and not self._inside_added(text, i):
                return i
            pos = i + 1
        return None

    def _inside_added(self, text: str, i: int) -> bool:
        """Whether an occurrence of an added token spans position i (starts before it, ends after)."""
        for token in self.added:
            start = text.find(token, max(0, i - len(token) + 1), i + len(token) - 1)
            if start != -1 and start < i:
                return True
        return False


# Where a cut may be (zero-width), found fast; each place found is then checked by `_allowed` with
# Python's own Unicode database (the regex module's may be newer).
_CANDIDATE = regex.compile(r"(?<=\p{N})(?=\P{M})|(?<=\p{L})(?=[^\p{L}\p{M}])|(?<=[\p{L}\p{N}\p{M}\p{P}\p{S}])(?= )"
                           r"|(?<=[\r\n])(?=[^\s\p{M}])")


def _allowed(before: str, after: str) -> bool:
    """The cut rules of the module docstring, for the characters either side of the cut."""
    a, b = unicodedata.category(before), unicodedata.category(after)
    if a == "Cn" or b == "Cn" or b[0] == "M":
        return False
    if a[0] == "N" or (a[0] == "L" and b[0] != "L"):
        return True
    if after == " ":
        return a[0] in "LNMPS"
    return before in "\r\n" and not after.isspace()


def _settings(component) -> dict | None:
    """A tokenizer component's settings, as tokenizer.json writes them (None for no component)."""
    return None if component is None else json.loads(component.__getstate__())


def _qwen_pre_tokenizer(pre: object) -> bool:
    """Qwen2/Qwen3's: the split regex (isolated), then byte-level without a regex or a prefix space."""
    if not isinstance(pre, dict) or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", ())) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split == {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex"))
