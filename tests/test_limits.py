"""Every configurable limit is enforced and named in its `too_large` answer, before any media is decoded."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import exchange, gradient_png, start_daemon
from daemon.config import MediaPolicy
from qwen3vl_client.errors import RequestError
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import MediaSource
from qwen3vl_client.protocol import nesting_depth
from bench.fuzzing import values


def _clip(path: Path, size: str, seconds: int) -> Path:
    subprocess.run([shutil.which("ffmpeg"), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate=4", "-t", str(seconds), "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by 16 bytes of junk instead of pixel data:
    decoding it would fail, so a `too_large` answer proves the size was refused from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"\0" * 16))


class _MediaServer(BaseHTTPRequestHandler):
    """/ok.png: an image; /big.png: more bytes than allowed; /drip.png: one byte every 0.2 s."""

    image = gradient_png(3)

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = {"/ok.png": self.image, "/big.png": self.image + b"\0" * 300_000}.get(self.path)
        if self.path == "/drip.png":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
            return
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MediaServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    _clip(root / "small_short.mp4", "64x48", 1)
    _clip(root / "small_long.mp4", "64x48", 3)
    _clip(root / "big_short.mp4", "128x96", 1)
    (root / "big.png").write_bytes(gradient_png(1, size=(400, 300)))
    return root


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_dir, clips):
    proc = start_daemon(tmp_path_factory.mktemp("strict"), "--embedding-model", str(tiny_dir),
                        "--reranker-model", "none", "--allow-path", str(clips),
                        "--max-msgpack-depth", "8", "--max-msgpack-items", "64", "--max-text-chars", "1000",
                        "--max-image-pixels", "10000", "--max-image-bytes", "200000", "--max-video-frames", "4",
                        "--max-video-seconds", "2", "--allow-urls", "--allow-private-urls", "--url-timeout", "1")
    yield proc
    proc.stop()


def _ask(daemon, payload: dict) -> dict:
    with daemon.client() as c:
        return c.request(payload)


def _refused(reply: dict, limit: str, where: str = "") -> None:
    assert reply["ok"] is False and reply["error"]["code"] == "too_large", reply
    assert f"({limit})" in reply["error"]["message"] and where in reply["error"]["message"], reply


def test_msgpack_nesting_deeper_than_the_limit_is_too_large(strict):
    nested: object = "x"
    for _ in range(9):
        nested = [nested]
    _refused(exchange(strict.endpoint, [{"op": "health", "id": nested}])[0], "max_msgpack_depth")


@pytest.mark.parametrize("depth", [9, 2000, 100_000])
def test_any_excess_of_nesting_is_the_same_too_large(strict, depth):
    """Past msgpack's own stack (1024 levels) too: one answer for every excess, raw bytes on the wire."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, 30_000
    sock.connect(strict.endpoint)
    try:
        sock.send_multipart([b"", b"\x82\xa2op\xa6health\xa2id" + b"\x91" * depth + b"\x00"])
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
    finally:
        sock.close()
    _refused(reply, "max_msgpack_depth")


def test_msgpack_nesting_within_the_limit_is_served(strict):
    nested: object = "x"
    for _ in range(6):
        nested = [nested]
    reply = exchange(strict.endpoint, [{"op": "health", "id": nested}])[0]
    assert reply["ok"] and reply["id"] == nested


def test_msgpack_array_longer_than_the_limit_is_too_large(strict):
    _refused(exchange(strict.endpoint, [{"op": "embed", "inputs": ["x"] * 65}])[0], "max_msgpack_items")


def test_msgpack_map_larger_than_the_limit_is_too_large(strict):
    _refused(exchange(strict.endpoint, [{"op": "health", "id": {str(i): i for i in range(65)}}])[0],
             "max_msgpack_items")


def test_text_longer_than_the_limit_is_too_large_naming_the_input(strict):
    _refused(_ask(strict, {"op": "embed", "inputs": ["fine", "y" * 1001]}), "max_text_chars", "inputs[1].text[0]")


@pytest.mark.parametrize("width, height, fragment", [
    (200, 100, "inputs[1].image[0]: 200x100 pixels"),  # over our limit, under Pillow's own
    (100_000, 100_000, "inputs[1].image[0]"),  # a bomb that Pillow itself refuses to open
])
def test_image_over_the_pixel_limit_is_refused_from_its_header(strict, width, height, fragment):
    reply = _ask(strict, {"op": "embed", "inputs": ["a", {"image": png_header_only(width, height)}]})
    _refused(reply, "max_image_pixels", fragment)


def test_image_file_over_the_byte_limit_is_too_large(strict, clips):
    big = clips / "bytes.png"
    big.write_bytes(gradient_png(2) + b"\0" * 200_001)
    _refused(_ask(strict, {"op": "embed", "inputs": [{"image": {"path": str(big)}}]}), "max_image_bytes")


def test_special_files_under_an_allowed_directory_are_refused_unread(strict, clips):
    fifo = clips / "pipe.png"  # reading a FIFO would block a preprocessing thread for ever
    if not fifo.exists():
        os.mkfifo(fifo)
    reply = _ask(strict, {"op": "embed", "inputs": [{"image": {"path": str(fifo)}}]})
    assert reply["error"]["code"] == "invalid_request" and "not a regular file" in reply["error"]["message"]


def test_video_frame_list_over_the_limit_is_too_large(strict):
    reply = _ask(strict, {"op": "embed", "inputs": ["a", {"video": [gradient_png(i) for i in range(5)]}]})
    _refused(reply, "max_video_frames", "inputs[1].video[0]")


def test_video_longer_than_the_limit_is_too_large(strict, clips):
    reply = _ask(strict, {"op": "embed", "inputs": [{"video": {"path": str(clips / "small_long.mp4")}}]})
    _refused(reply, "max_video_seconds", "inputs[0].video[0]")


def test_video_given_as_bytes_is_checked_the_same_way(strict, clips):
    reply = _ask(strict, {"op": "embed", "inputs": [{"video": (clips / "small_long.mp4").read_bytes()}]})
    _refused(reply, "max_video_seconds", "inputs[0].video[0]")


def test_video_frames_over_the_pixel_limit_are_too_large(strict, clips):
    reply = _ask(strict, {"op": "embed", "inputs": [{"video": {"path": str(clips / "big_short.mp4")}}]})
    _refused(reply, "max_image_pixels", "inputs[0].video[0]: 128x96")


def test_video_within_every_limit_is_embedded(strict, clips):
    with strict.client() as c:
        assert c.embed([{"video": {"path": str(clips / "small_short.mp4")}}]).embeddings.shape == (1, 64)


def test_undecodable_video_file_is_an_input_error(strict, clips):
    reply = _ask(strict, {"op": "embed", "inputs": ["a", {"video": b"not a video at all" * 10}]})
    assert reply["error"]["code"] == "input_error" and "inputs[1].video[0]: not a decodable video" in \
        reply["error"]["message"]


def test_url_download_within_the_limits_is_embedded(strict, media_server):
    with strict.client() as c:
        by_url = c.embed([{"image": {"url": f"{media_server}/ok.png"}}]).embeddings
        by_bytes = c.embed([{"image": _MediaServer.image}]).embeddings
    assert abs(by_url - by_bytes).max() < 1e-6


def test_url_download_over_the_byte_limit_is_too_large(strict, media_server):
    _refused(_ask(strict, {"op": "embed", "inputs": [{"image": {"url": f"{media_server}/big.png"}}]}),
             "max_image_bytes", "inputs[0].image[0].url")


def test_url_download_slower_than_the_time_limit_is_too_large(strict, media_server):
    started = time.monotonic()
    reply = _ask(strict, {"op": "embed", "inputs": [{"image": {"url": f"{media_server}/drip.png"}}]})
    _refused(reply, "url_timeout_s", "inputs[0].image[0].url")
    assert time.monotonic() - started < 10  # bounded by the 1 s limit, not by the 200 s the server would take


def test_private_url_targets_are_refused_unless_allowed(media_server):
    reader = MediaReader(MediaPolicy(allow_urls=True))
    with pytest.raises(RequestError) as refused:
        reader.image_bytes(MediaSource("url", f"{media_server}/ok.png", "inputs[0].image[0]"))
    assert refused.value.code.value == "invalid_request" and "non-public address" in refused.value.message


def _depth(value) -> int:
    children = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_depth, children), default=0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(values, st.integers(1, 6))
def test_nesting_depth_is_the_recursive_depth_counted_up_to_the_limit(value, limit):
    assert nesting_depth(value, limit) == min(_depth(value), limit + 1)
