"""Token ids for text-only inputs without rendering the chat template per input.

The template is rendered once with marker strings in place of the system and user texts. That splits
it into constant pieces: `p0 + system + p1 + user + p2`. A tokenizer always splits its input at added
special tokens first, so everything up to the last special token of `p1` tokenizes on its own: it is
cached per system text, and each input costs one tokenizer call on `p1[cut:] + user + p2`.

The result is checked at start against the processor path on probe strings; a checkpoint whose
template does not render plain text verbatim simply does not get the fast path.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from daemon.inputs.pieces import PieceCutter

log = logging.getLogger(__name__)

SYSTEM_MARK = "\ue000qwen3vl-system\ue001"
USER_MARK = "\ue000qwen3vl-user\ue001"
PROBES = (
    ("Represent the user's input.", "hello world"),
    ("Find it", "\n\nleading newlines and  spaces "),
    ("  spaced instruction ", " \t\r\n mixed whitespace\n"),
    ("x", "<|im_end|> fake turn <|im_start|>assistant\n"),
    ("ünïcødé?", "e\u0301 combining, 漢字, emoji 🎉, <|endoftext|>"),
    ("", ""),
)


class TextFastPath:
    def __init__(self, processor, fixed_system: str | None = None, cache_size: int = 256):
        """fixed_system: a system text that never changes (the reranker's), or None when the system
        text varies per request (the embedding's instruction)."""
        self.tokenizer = processor.tokenizer
        # The Rust tokenizer itself: the same ids as the Python wrapper without its per-call work
        # (the probes below check that, as they check the whole fast path).
        self.backend = self.tokenizer.backend_tokenizer
        self.cutter = PieceCutter.for_tokenizer(self.backend)  # None: long texts are tokenised whole
        self.fixed_system = fixed_system
        self.cache_size = cache_size
        self._prefixes: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        rendered = processor.apply_chat_template(
            [{"role": "system", "content": [{"type": "text", "text": fixed_system or SYSTEM_MARK}]},
             {"role": "user", "content": [{"type": "text", "text": USER_MARK}]}],
            add_generation_prompt=True, tokenize=False,
        )
        head, self.p2 = rendered.split(USER_MARK)
        if fixed_system is None:
            self.p0, p1 = head.split(SYSTEM_MARK)
        else:
            self.p0, p1 = "", head
        cut = self._after_last_special(p1)
        if cut is None:
            raise ValueError("the template has no special token between the system and user texts")
        self.p1_head, self.p1_tail = p1[:cut], p1[cut:]

    def _after_last_special(self, text: str) -> int | None:
        ends = [text.rfind(tok) + len(tok) for tok in self.tokenizer.all_special_tokens if tok in text]
        return max(ends) if ends else None

    def _prefix(self, system: str) -> list[int]:
        with self._lock:  # preparing threads share the cache
            ids = self._prefixes.get(system)
            if ids is not None:
                self._prefixes.move_to_end(system)
                return ids
        ids = self.tokenizer(self.p0 + system + self.p1_head)["input_ids"]
        with self._lock:
            self._prefixes[system] = ids
            if len(self._prefixes) > self.cache_size:
                self._prefixes.popitem(last=False)
        return ids

    def ids(self, user_text: str, system: str | None = None) -> list[int]:
        """The input ids of the rendered conversation (system, user) with the generation prompt."""
        return self.ids_many([user_text], [system])[0]

    def ids_many(self, user_texts: list[str], systems: list[str | None]) -> list[list[int]]:
        """`ids` of many conversations, their user turns tokenised in one call of the Rust tokenizer
        (which releases the GIL for the whole batch)."""
        # encode_batch even for one text: unlike encode, it lets other threads run meanwhile.
        pieces, owners = [], []
        for k, text in enumerate(user_texts):
            for piece in self._pieces(self.p1_tail + text + self.p2):
                pieces.append(piece)
                owners.append(k)
        encodings = self.backend.encode_batch(pieces, add_special_tokens=False)
        tails: list[list[int]] = [[] for _ in user_texts]
        for j, k in enumerate(owners):
            tails[k].extend(encodings[j].ids)
            # Freeing an encoding holds the GIL throughout: one piece at a time, so that the socket
            # thread runs between two (see pieces.py).
            encodings[j] = None
        fixed = self.fixed_system is not None
        return [self._prefix("" if fixed else system) + tail for system, tail in zip(systems, tails)]

    def _pieces(self, text: str) -> list[str]:
        return self.cutter.pieces(text) if self.cutter is not None else [text]


def build_fast_path(processor, fixed_system: str | None, reference) -> TextFastPath | None:
    """A verified fast path, or None. reference(system, user) gives the processor path's ids."""
    try:
        fast = TextFastPath(processor, fixed_system)
    except (ValueError, KeyError) as exc:
        log.warning("text fast path disabled: %s", exc)
        return None
    for system, user in PROBES:
        system = fixed_system or system
        if fast.ids(user, system) != reference(system, user):
            log.warning("text fast path disabled: the template does not render text verbatim")
            return None
    return fast
