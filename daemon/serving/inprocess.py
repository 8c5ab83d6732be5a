"""The daemon's models in this process, without a socket: `request(payload)` gives the reply map a
daemon would send for that payload, through the same decoding, handlers, engine and encoding.

For callers that hold the models themselves (the dataset job's Ray actors): one request at a time,
and the calling thread runs the model while it waits, as the daemon's main thread does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from daemon.config import DaemonConfig
from daemon.core import Core
from daemon.engine.engine import EngineState, Job, JobResult
from daemon.errors import ModelLoadError
from qwen3vl_client.errors import ErrorCode, RequestError, internal_error
from qwen3vl_client.protocol import decode_payload, decode_reply, encode_error, encode_reply, pack, parse_request

log = logging.getLogger(__name__)


class InProcessDaemon:
    def __init__(self, config: DaemonConfig):
        self.core = Core.build(config)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Load the models (and warm them, as configured); ModelLoadError says why they cannot be."""
        engine = self.core.engine
        engine.load()
        if engine.state is not EngineState.READY:
            raise ModelLoadError(engine.load_error or f"the models are {engine.state.value}")

    def request(self, payload: dict) -> dict:
        """The reply map for one request payload (errors are in it, as a daemon sends them)."""
        with self._lock:
            return decode_reply(self._answer(payload))

    def _answer(self, payload: dict) -> bytes:
        config, request_id = self.core.config, payload.get("id")
        try:
            request = parse_request(decode_payload(pack(payload), config.limits), config.limits, config.media)
            handler = self.core.handlers[request.op]
            started = handler.start(request)
            if not isinstance(started, Job):
                return encode_reply(request_id, started)
            outcome = self._run(started)
            if isinstance(outcome, RequestError):
                return encode_error(request_id, outcome)
            return encode_reply(request_id, handler.finish(request, started, outcome))
        except RequestError as exc:
            return encode_error(request_id, exc)
        except Exception as exc:  # as in the daemon: a bug fails this request, not the caller
            self.core.tracebacks.log(log, "an in-process request failed")
            return encode_error(request_id, internal_error(exc))

    def _run(self, job: Job) -> JobResult | RequestError:
        done, box = threading.Event(), {}

        def finished(outcome: JobResult | RequestError) -> None:
            box["outcome"] = outcome
            done.set()

        self.core.engine.submit(job, finished)
        self.core.engine.run_until(done)
        return box.get("outcome") or RequestError(ErrorCode.SHUTTING_DOWN, "the models were stopped")

    def health(self) -> dict[str, Any]:
        return self.request({"op": "health"})

    def close(self) -> None:
        self.core.engine.drain()
        self.core.engine.stop()
