"""The socket loop stays responsive and bounded whatever clients send: large inline-sized requests
are never worked on by the socket thread, the watchdog keeps time, and a message's frames and bytes
are bounded before anything is held."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from conftest import start_daemon
from bench.probes import NotifySocket, health_latencies

WATCHDOG_S = 2.0  # WatchdogSec in the test: pings due every 1 s


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("watched")
    notify = NotifySocket(tmp)
    proc = start_daemon(tmp, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir),
                        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))})
    yield proc, notify
    proc.stop()
    notify.close()


def test_health_and_watchdog_keep_time_while_huge_inline_sized_requests_run(watched):
    """The reported stall: embeds of 4 texts of 1M characters and reranks of a 1M-character query
    with 4 documents of 1M (each once tokenized on the socket thread). Three of them at once while
    health is asked continuously: every health answer is fast and no watchdog ping is late."""
    proc, notify = watched
    huge = "lorem ipsum dolor sit amet " * 37_000  # ~1M characters
    payloads = [{"op": "embed", "id": 0, "inputs": [huge] * 4},
                {"op": "rerank", "id": 1, "query": huge, "documents": [huge] * 4},
                {"op": "rerank", "id": 2, "query": huge, "documents": [huge] * 4}]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 300_000
    sock.connect(proc.endpoint)
    replies: list = []
    started = time.monotonic()

    def send_and_wait():
        for p in payloads:
            sock.send_multipart([b"", msgpack.packb(p)])
        replies.extend(msgpack.unpackb(sock.recv_multipart()[-1]) for _ in payloads)

    worker = threading.Thread(target=send_and_wait)
    worker.start()
    time.sleep(0.2)
    latencies = health_latencies(proc.endpoint, 6.0)
    worker.join()
    sock.close()
    finished = time.monotonic()
    assert sorted(r["id"] for r in replies) == [0, 1, 2] and all(r["ok"] for r in replies), replies
    pings = [t for t in notify.times("WATCHDOG") if started <= t <= finished]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(latencies) > 50
    # The defect this guards is a stall of seconds (10.6 s once); a shared 2-core CI adds noise of a
    # few hundred ms, so the bounds sit between the two. Measured figures: bench.hostile.
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert sorted(latencies)[len(latencies) // 2] < 0.1
    assert gaps and max(gaps) < WATCHDOG_S, gaps  # pings due every 1 s; systemd kills at 2 s


def _raw(endpoint: str, frames: list[bytes], timeout_ms: int = 30_000) -> list[bytes] | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, timeout_ms
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart()
    except zmq.Again:
        return None
    finally:
        sock.close()


def test_too_many_frames_are_refused_with_the_envelope_echoed(watched):
    proc, _ = watched
    health = msgpack.packb({"op": "health", "id": 7})
    reply = _raw(proc.endpoint, [b"tag", b""] + [b"x"] * 20 + [health])
    assert reply[:2] == [b"tag", b""]
    body = msgpack.unpackb(reply[-1])
    assert body["error"]["code"] == "too_large" and "frames" in body["error"]["message"]


def test_an_oversized_routing_frame_is_refused(watched):
    proc, _ = watched
    reply = _raw(proc.endpoint, [b"t" * 4096, b"", msgpack.packb({"op": "health"})])
    assert reply is not None and msgpack.unpackb(reply[-1])["error"]["code"] == "too_large"


def test_a_message_of_many_large_frames_is_refused_and_its_memory_given_back(watched):
    """The reported case: 10 envelope frames of 60 MiB and a tiny payload (600 MiB in one message).
    It is refused, and the daemon's resident memory afterwards is within 64 MiB of before: nothing
    of it is kept (libzmq itself buffers a message whole before handing over its first frame)."""
    proc, _ = watched
    with proc.client() as c:
        c.health()
    before = _rss_mib(proc.process.pid)
    big = b"\0" * (60 << 20)
    reply = _raw(proc.endpoint, [b"tag"] + [big] * 10 + [b"", msgpack.packb({"op": "health"})], timeout_ms=60_000)
    del big
    assert reply is not None and msgpack.unpackb(reply[-1])["error"]["code"] == "too_large"
    time.sleep(0.5)
    after = _rss_mib(proc.process.pid)
    assert after - before < 64, (before, after)
    with proc.client() as c:
        assert c.health()["status"] == "ready"


def test_a_valid_request_after_the_refusals_is_served(watched):
    proc, _ = watched
    with proc.client() as c:
        assert c.embed(["still here"]).embeddings.shape[0] == 1


def solid_png(width: int, height: int) -> bytes:
    """A real, decodable PNG of one colour, built row by row (a few hundred KB for 8000x8000)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" + b"\x80" * (3 * width), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_many_huge_images_in_one_input_are_refused_from_their_headers(watched):
    """The reported case: one input holding 20 copies of a small PNG declaring 8000x8000 pixels
    (192 MB each once decoded). The vision-token budget is computed from the headers and the input
    refused before any pixel is decoded: resident memory grows by less than 64 MiB."""
    proc, _ = watched
    png = solid_png(8000, 8000)
    assert len(png) < 1_000_000
    with proc.client(timeout=120) as c:
        c.health()
        before = _rss_mib(proc.process.pid)
        reply = c.request({"op": "embed", "inputs": [{"image": [png] * 20}]})
        after = _rss_mib(proc.process.pid)
    assert reply["error"]["code"] == "too_large" and "(embedding_max_length)" in reply["error"]["message"], reply
    assert "35320 vision tokens" in reply["error"]["message"]  # 20 x (42 x 42 + 2), from the headers
    assert after - before < 64, (before, after)


def test_a_video_of_huge_frames_is_refused_from_their_headers(watched):
    from test_limits import png_header_only  # headers only: a decode would fail, so too_large proves none ran

    proc, _ = watched
    with proc.client() as c:
        reply = c.request({"op": "embed", "inputs": [{"video": [[png_header_only(4000, 4000)] * 64]}]})
    assert reply["error"]["code"] == "too_large" and "(max_video_pixels)" in reply["error"]["message"], reply
