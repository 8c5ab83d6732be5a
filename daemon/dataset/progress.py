"""How a dataset job goes: a bar on a terminal (tqdm: rows, rows/s, ETA), else a plain line every
few seconds, and the summary at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

LOG_EVERY_S = 5.0


@dataclass(frozen=True)
class Summary:
    written: int  # rows this run committed
    errors: int  # rows this run recorded in errors.jsonl
    skipped: int  # rows done before this run (committed or recorded), or left alone
    seconds: float
    out: str

    @property
    def rows_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"embed-dataset: {self.written} rows written, {self.errors} errors, {self.skipped} already done, "
                f"{self.seconds:.1f} s, {self.rows_per_s:.1f} rows/s -> {self.out}")

    def to_json(self) -> dict:
        return {"written": self.written, "errors": self.errors, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 1), "out": self.out}


class Progress:
    def __init__(self, total: int, done_before: int, stream: TextIO | None = None, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, every_s: float = LOG_EVERY_S):
        self.stream = stream or sys.stderr
        self.total, self.done_before = total, done_before
        self.written = self.errors = 0
        self.clock, self.every_s = clock, every_s
        self.started = self._last = clock()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=min(done_before, total), unit="rows", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def advance(self, written: int, errors: int) -> None:
        self.written += written
        self.errors += errors
        if self._bar is not None:
            self._bar.update(written + errors)
            if errors:
                self._bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.stream.write(self.log_line(now) + "\n")
            self.stream.flush()

    def log_line(self, now: float) -> str:
        done = self.done_before + self.written + self.errors
        elapsed = max(now - self.started, 1e-9)
        rate = (self.written + self.errors) / elapsed
        left = max(self.total - done, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        share = f" ({100 * done / self.total:.1f}%)" if self.total else ""
        return (f"embed-dataset: {done}/{self.total} rows{share}, {rate:.1f} rows/s, {self.errors} errors, "
                f"ETA {eta}")

    def close(self, out: str, skipped: int) -> Summary:
        if self._bar is not None:
            self._bar.close()
        return Summary(self.written, self.errors, skipped, self.clock() - self.started, out)
