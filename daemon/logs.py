"""Logging: a quiet setup for the libraries the daemon loads, and tracebacks that cannot flood a log."""

from __future__ import annotations

import logging
import os
import threading
import time


def quiet_libraries(cpu_count: int | None = None) -> None:
    """No progress bars, no per-video INFO lines, decoder threads sized to this machine.

    Call before the libraries are imported where possible: some read the environment at import."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # qwen_vl_utils reads this per video and defaults to 8 decoder threads whatever the machine.
    os.environ.setdefault("TORCHCODEC_NUM_THREADS", str(max(1, min(8, cpu_count or os.cpu_count() or 1))))
    # Its fallback reader (torchvision.io.read_video) no longer exists: decode with torchcodec only.
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")
    # Its INFO and WARNING lines come per video and per request (a frame count adjusted, a reader
    # falling back); the daemon answers each failure itself.
    logging.getLogger("qwen_vl_utils").setLevel(logging.ERROR)
    logging.getLogger("qwen_vl_utils.vision_process").setLevel(logging.ERROR)
    # torchao's import registers enums with torch's pytree, which warns on each (two lines per start).
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class TracebackLimiter:
    """Log the tracebacks of internal errors, at most `burst` per `period_s`; past that, count them
    and say how many were left out once the period is over. Every error still gets its reply."""

    def __init__(self, burst: int = 5, period_s: float = 60.0, clock=time.monotonic):
        self.burst, self.period_s, self._clock = burst, period_s, clock
        self._start = clock()
        self._logged = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, message: str, exc: BaseException | None = None) -> bool:
        """Call from an `except` block, or pass the exception. Returns whether the traceback was written."""
        with self._lock:
            now = self._clock()
            if now - self._start >= self.period_s:
                if self._suppressed:
                    logger.error("%d more internal error traceback(s) left out in the last %g s",
                                 self._suppressed, self.period_s)
                self._start, self._logged, self._suppressed = now, 0, 0
            if self._logged >= self.burst:
                self._suppressed += 1
                return False
            self._logged += 1
        logger.error(message, exc_info=exc if exc is not None else True)
        return True
