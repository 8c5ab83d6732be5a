"""What a client can make the daemon read: the URL policy (SSRF) and the allowed-directory walk.

The URL policy is tested as a table of forms with a stand-in resolver and connection (no network):
every refused form never reaches the connection, and every allowed one connects to exactly the
address that was checked. Live tests use loopback servers only, which must record zero requests.
"""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import gradient_png, start_daemon
from daemon.config import MediaPolicy
from qwen3vl_client.errors import RequestError
from daemon.inputs.files import AllowedFiles
from daemon.inputs.urls import UrlFetcher, address_allowed, parse_target

PUBLIC = "93.184.216.34"  # only ever handed to the stand-in connection below, never dialled


class FakeResponse:
    def __init__(self, status=200, body=b"img", location=None):
        self.status, self._body = status, [body]
        self.headers = {"location": location} if location else {}

    def read1(self, _n):
        return self._body.pop() if self._body else b""

    def release_conn(self):
        pass

    def close(self):
        pass


class FakeNet:
    """A resolver and a connection that record what they were asked; nothing goes on the network."""

    def __init__(self, answers: dict[str, list[list[str]]], responses: dict[str, FakeResponse] | None = None):
        self.answers = {h: list(a) for h, a in answers.items()}  # each lookup takes the next answer
        self.responses = responses or {}
        self.lookups: list[str] = []
        self.connects: list[tuple[str, str, str]] = []

    def resolve(self, host, _port):
        self.lookups.append(host)
        queue = self.answers.get(host)
        if not queue:
            raise OSError("unknown host")
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def open(self, target, address, _timeout):
        self.connects.append((address, target.host_header, target.path))
        return self.responses.get(target.path, FakeResponse())


def fetcher(net: FakeNet, **policy) -> UrlFetcher:
    return UrlFetcher(MediaPolicy(allow_urls=True, **policy), resolver=net.resolve, opener=net.open)


def refused(fetch: UrlFetcher, url: str) -> RequestError:
    with pytest.raises(RequestError) as info:
        fetch.fetch(url, "inputs[0].image[0]", 1 << 20, "max_image_bytes")
    assert "inputs[0].image[0].url" in info.value.message
    return info.value


# Forms that must be refused whatever they resolve to: two parsers could read them differently, or
# they carry credentials, or they are not http(s).
AMBIGUOUS = [
    "http://127.0.0.1:8080\\@1.1.1.1/red.png",  # the reported bypass: urlparse sees 1.1.1.1
    "http://1.1.1.1\\@127.0.0.1/",
    "http://user@example.com/",
    "http://user:pw@example.com/",
    "http://example.com@127.0.0.1/",
    "http://@example.com/",
    "http://example.com:80@127.0.0.1/",
    "http://example.com\t.evil/",
    "http://example.com\n/",
    "http://example.com\x00.evil/",
    "http://exa mple.com/",
    "http://example.com/a b",
    "http://[::1%25eth0]/",
    "http://[fe80::1%eth0]/",
    "http://[::1/",
    "http://exämple.com/",
    "http://example.com:99999/",
    "http://example.com:-1/",
    "http://example.com:8o/",
    "http://-bad-.com/",
    "http://a..b/",
    "http:///path-only",
    "http:example.com/",
    "ftp://example.com/x.png",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_",
    "//example.com/x.png",
    "",
]


@pytest.mark.parametrize("url", AMBIGUOUS)
def test_ambiguous_or_credentialed_urls_are_refused_before_any_lookup(url):
    net = FakeNet({"example.com": [[PUBLIC]], "1.1.1.1": [["1.1.1.1"]], "127.0.0.1": [["127.0.0.1"]]})
    error = refused(fetcher(net, allow_private_urls=True), url)
    assert error.code.value == "invalid_request"
    assert net.lookups == [] and net.connects == []


# Addresses that must never be connected to without --allow-private-urls, in every way of writing them.
NON_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "192.0.0.8", "198.18.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1", "::10.0.0.1", "::169.254.169.254",  # IPv4-compatible (Python calls ::127.0.0.1 global)
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of loopback, private, metadata
    "64:ff9b:1::1", "64:ff9b:1::5db8:d822",  # local-use NAT64 (RFC 8215)
    "2002:7f00:1::", "2002:a00:1::1", "2002:c0a8:101::1",  # 6to4 of loopback and private
    "2001::1", "2001:db8::1", "100::1",  # Teredo, documentation, discard
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_not_allowed(address):
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34",
                                     "64:ff9b::5db8:d822", "2002:5db8:d822::1"])
def test_public_addresses_are_allowed_including_ipv4_inside_ipv6(address):
    assert address_allowed(address)


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_a_host_resolving_to_a_non_public_address_is_refused_unconnected(address):
    net = FakeNet({"media.example": [[address]]})
    error = refused(fetcher(net), "http://media.example/x.png")
    assert error.code.value == "invalid_request" and "non-public address" in error.message
    assert net.connects == []


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
                                  "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "localhost", "LOCALHOST."])
def test_loopback_in_any_spelling_is_refused_by_what_it_resolves_to(host):
    net = FakeNet({})

    def resolve(name, port):  # numeric spellings resolve as the system reads them; names to loopback
        net.lookups.append(name)
        import socket
        try:
            return [socket.getaddrinfo(name, port, flags=socket.AI_NUMERICHOST)[0][4][0]]
        except socket.gaierror:
            return ["127.0.0.1"]

    fetch = UrlFetcher(MediaPolicy(allow_urls=True), resolver=resolve, opener=net.open)
    assert refused(fetch, f"http://{host}:8080/x.png").code.value == "invalid_request"
    assert net.connects == []


def test_one_non_public_address_among_several_refuses_the_host():
    net = FakeNet({"media.example": [[PUBLIC, "10.0.0.7"]]})
    refused(fetcher(net), "http://media.example/x.png")
    assert net.connects == []


def test_dns_rebinding_cannot_switch_the_address_after_the_check():
    # A resolver that answers public first and loopback on every later lookup.
    net = FakeNet({"rebind.example": [[PUBLIC], ["127.0.0.1"]]})
    data = fetcher(net).fetch("http://rebind.example:8080/x.png?v=1", "inputs[0].image[0]", 100, "max_image_bytes")
    assert data == b"img"
    assert net.lookups == ["rebind.example"]  # resolved once
    assert net.connects == [(PUBLIC, "rebind.example:8080", "/x.png?v=1")]  # the checked address, Host kept


def test_every_redirect_hop_is_checked_again():
    net = FakeNet({"media.example": [[PUBLIC]], "internal.example": [["10.1.2.3"]]},
                  {"/start": FakeResponse(302, location="http://internal.example/secret")})
    refused(fetcher(net), "http://media.example/start")
    assert [c[0] for c in net.connects] == [PUBLIC]


@pytest.mark.parametrize("location", ["http://127.0.0.1/", "http://[::ffff:7f00:1]/", "http://a\\@127.0.0.1/",
                                      "file:///etc/passwd", "http://user@media.example/"])
def test_a_redirect_to_a_refused_form_is_refused(location):
    net = FakeNet({"media.example": [[PUBLIC]]}, {"/start": FakeResponse(301, location=location)})
    refused(fetcher(net), "http://media.example/start")
    assert len(net.connects) == 1


def test_a_relative_redirect_stays_on_the_checked_host():
    net = FakeNet({"media.example": [[PUBLIC]]}, {"/start": FakeResponse(307, location="/final.png")})
    assert fetcher(net).fetch("https://media.example/start", "x", 100, "max_image_bytes") == b"img"
    assert [c[2] for c in net.connects] == ["/start", "/final.png"]


def test_redirect_loops_end():
    net = FakeNet({"media.example": [[PUBLIC]]}, {"/loop": FakeResponse(302, location="/loop")})
    assert "too many redirects" in refused(fetcher(net), "http://media.example/loop").message


def test_https_keeps_the_name_for_the_certificate_and_the_host_header():
    target = parse_target("https://Media.Example./a?b=c#frag", "x")
    assert (target.scheme, target.host, target.port, target.path, target.host_header) == \
        ("https", "media.example", 443, "/a?b=c", "media.example")
    assert parse_target("http://[2606:4700::1]:8080/", "x").host_header == "[2606:4700::1]:8080"


def test_private_addresses_are_connected_when_the_operator_allows_them():
    net = FakeNet({"printer.lan": [["192.168.1.9"]]})
    assert fetcher(net, allow_private_urls=True).fetch("http://printer.lan/x", "x", 100, "max_image_bytes") == b"img"
    assert net.connects[0][0] == "192.168.1.9"


# -- live, loopback only -----------------------------------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(gradient_png(2))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def public_only(tmp_path_factory, tiny_dir):
    proc = start_daemon(tmp_path_factory.mktemp("urls"), "--embedding-model", str(tiny_dir), "--reranker-model",
                        "none", "--allow-urls", "--url-timeout", "2")
    yield proc
    proc.stop()


def test_live_daemon_never_reaches_a_loopback_server_through_any_url_form(public_only, recorder):
    port = recorder
    forms = [f"http://127.0.0.1:{port}/a.png", f"http://127.0.0.1:{port}\\@127.0.0.2/b.png",
             f"http://localhost:{port}/c.png", f"http://[::ffff:127.0.0.1]:{port}/d.png",
             f"http://[::127.0.0.1]:{port}/e.png", f"http://2130706433:{port}/f.png", f"http://0x7f.1:{port}/g.png",
             f"http://127.1:{port}/h.png", f"http://x@127.0.0.1:{port}/i.png", f"http://127.0.0.1:{port}#@x/j.png"]
    _Recorder.hits.clear()
    with public_only.client(timeout=10) as c:
        replies = [c.request({"op": "embed", "inputs": [{"image": {"url": url}}]}) for url in forms]
    assert all(r["ok"] is False and r["error"]["code"] == "invalid_request" for r in replies), replies
    assert _Recorder.hits == []


# -- allowed directories -----------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "in.png").write_bytes(b"inside")
    (allowed / "sub" / "deep.png").write_bytes(b"deep")
    (outside / "secret.png").write_bytes(b"secret")
    (outside / "deep.png").write_bytes(b"outside-deep")
    return allowed, outside


def _read(files: AllowedFiles, path) -> bytes:
    return files.read(path, "inputs[0].image[0].path", 1 << 20, "max_image_bytes")


def _refusal(files: AllowedFiles, path) -> RequestError:
    with pytest.raises(RequestError) as info:
        _read(files, path)
    assert "inputs[0].image[0].path" in info.value.message
    return info.value


def test_files_under_an_allowed_directory_are_read(tree):
    allowed, _ = tree
    files = AllowedFiles((allowed,))
    assert _read(files, str(allowed / "in.png")) == b"inside"
    assert _read(files, str(allowed / "sub" / "deep.png")) == b"deep"
    assert _read(files, str(allowed) + "//sub/./deep.png") == b"deep"


def test_a_symlink_as_the_last_component_is_refused_even_inside(tree):
    allowed, outside = tree
    os.symlink(outside / "secret.png", allowed / "out.png")
    os.symlink(allowed / "in.png", allowed / "alias.png")  # pointing inside: still not followed
    files = AllowedFiles((allowed,))
    for name in ("out.png", "alias.png"):
        assert "symbolic link" in _refusal(files, str(allowed / name)).message


def test_a_symlinked_directory_component_is_refused(tree):
    allowed, outside = tree
    os.symlink(outside, allowed / "linkdir")
    assert "symbolic link" in _refusal(AllowedFiles((allowed,)), str(allowed / "linkdir" / "deep.png")).message


@pytest.mark.parametrize("suffix", ["/../outside/secret.png", "/sub/../../outside/secret.png", "/.."])
def test_dot_dot_is_refused(tree, suffix):
    allowed, _ = tree
    assert _refusal(AllowedFiles((allowed,)), str(allowed) + suffix).code.value == "invalid_request"


@pytest.mark.parametrize("path", ["relative.png", "", "in.png\x00.jpg", 42, None])
def test_relative_empty_nul_and_non_string_paths_are_invalid(tree, path):
    allowed, _ = tree
    if isinstance(path, str) and path.startswith("in.png"):
        path = str(allowed / path)
    assert _refusal(AllowedFiles((allowed,)), path).code.value == "invalid_request"


def test_a_sibling_directory_sharing_the_prefix_is_not_allowed(tree, tmp_path):
    allowed, _ = tree
    sibling = tmp_path / "allowed-not"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(b"x")
    assert "not under an allowed directory" in _refusal(AllowedFiles((allowed,)), str(sibling / "x.png")).message


def test_a_root_given_through_a_link_is_matched_by_both_names(tree, tmp_path):
    allowed, _ = tree
    os.symlink(allowed, tmp_path / "root-link")
    files = AllowedFiles((tmp_path / "root-link",))
    assert _read(files, str(tmp_path / "root-link" / "in.png")) == b"inside"
    assert _read(files, str(allowed / "in.png")) == b"inside"


def test_special_files_and_directories_are_refused_without_blocking(tree):
    allowed, _ = tree
    os.mkfifo(allowed / "fifo.png")
    files = AllowedFiles((allowed,))
    started = time.monotonic()
    assert "not a regular file" in _refusal(files, str(allowed / "fifo.png")).message
    assert "not a regular file" in _refusal(files, str(allowed / "sub")).message
    assert "not a regular file" in _refusal(files, str(allowed)).message
    assert time.monotonic() - started < 10  # the defect is an open that waits forever for a writer


def test_swapping_a_file_for_a_link_never_reads_outside(tree):
    """The reported race, on the reader itself: for 3 s one thread swaps a regular file and a
    symlink to an outside file under one name (and a directory and a symlinked directory on the
    way to another), while this thread reads both names. Zero outside reads allowed."""
    allowed, outside = tree
    files = AllowedFiles((allowed,))
    name, deep = allowed / "swap.png", allowed / "swapdir"
    stop, seen = threading.Event(), {"inside": 0, "refused": 0}

    def swapper():
        (allowed / "real").mkdir()
        (allowed / "real" / "deep.png").write_bytes(b"deep")
        while not stop.is_set():
            for target, link in ((outside / "secret.png", name), (outside, deep)):
                tmp = link.with_suffix(".tmp")
                os.symlink(target, tmp)
                os.replace(tmp, link)
            (allowed / "regular.tmp").write_bytes(b"inside")
            os.replace(allowed / "regular.tmp", name)
            os.rename(deep, allowed / "gone")
            os.rename(allowed / "real", deep)
            os.rename(deep, allowed / "real")
            os.unlink(allowed / "gone")

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for path in (name, deep / "deep.png"):
                try:
                    data = _read(files, str(path))
                except RequestError as exc:
                    assert exc.code.value in ("invalid_request", "input_error"), exc.message
                    seen["refused"] += 1
                    continue
                assert data in (b"inside", b"deep"), data  # never b"secret" or b"outside-deep"
                seen["inside"] += 1
    finally:
        stop.set()
        thread.join()
    assert seen["inside"] > 0 and seen["refused"] > 0, seen  # both sides of the race were hit


@pytest.fixture(scope="module")
def racing_daemon(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("race")
    (root / "allowed").mkdir()
    proc = start_daemon(root / "d", "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                        "--allow-path", str(root / "allowed"))
    yield proc, root
    proc.stop()


def test_live_race_between_file_and_link_never_embeds_the_outside_file(racing_daemon):
    """End to end: 4 s of swaps while a client embeds the path; every reply is the inside image's
    embedding or a clear refusal, never the outside image's, and never `internal`."""
    daemon, root = racing_daemon
    allowed = root / "allowed"
    inside_png, outside_png = gradient_png(10), gradient_png(99)
    (root / "outside.png").write_bytes(outside_png)
    name = allowed / "photo.png"
    with daemon.client(timeout=30) as c:
        inside_vec = c.embed([{"image": inside_png}]).embeddings[0]
        outside_vec = c.embed([{"image": outside_png}]).embeddings[0]
        assert not np.allclose(inside_vec, outside_vec, atol=1e-4)
        stop = threading.Event()

        def swapper():
            while not stop.is_set():
                (allowed / "r.tmp").write_bytes(inside_png)
                os.replace(allowed / "r.tmp", name)
                os.symlink(root / "outside.png", allowed / "l.tmp")
                os.replace(allowed / "l.tmp", name)

        thread = threading.Thread(target=swapper)
        thread.start()
        counts = {"inside": 0, "refused": 0}
        try:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                reply = c.request({"op": "embed", "inputs": [{"image": {"path": str(name)}}] * 4})
                if not reply["ok"]:
                    assert reply["error"]["code"] in ("invalid_request", "input_error"), reply
                    counts["refused"] += 1
                    continue
                vectors = np.frombuffer(reply["embeddings"], dtype="<f4").reshape(4, -1)
                for vec in vectors:
                    assert not np.allclose(vec, outside_vec, atol=1e-4), "read the outside file"
                    assert np.allclose(vec, inside_vec, atol=1e-4)
                counts["inside"] += 1
        finally:
            stop.set()
            thread.join()
    assert counts["inside"] > 0 and counts["refused"] > 0, counts
