"""The soak: 16 clients for minutes, mixed valid, invalid and multimodal requests, against one daemon
(both models on the tiny checkpoint) and its HTTP bridge.

    .venv/bin/python -m bench.soak [--seconds 300] [--clients 16] [--http-clients 2] [--seed 0]

Before the load, every text, image and video of the pool is embedded alone, and every query-document
pair scored alone: the references. During the load each IPC client sends on its own raw DEALER socket
with a unique tag frame per request, so a reply that reaches the wrong request, or a second reply to
one, is seen; every returned vector and score is checked against its reference (a reply swapped
between clients, or a batch mixing inputs up, would fail this). Every bad request must get exactly the
error code its fault calls for, and every good one must succeed. The daemon's and the bridge's
resident memory are sampled every 2 s. Exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import numpy as np
import zmq
from PIL import Image

from bench.harness import Servers, rss_kib

from qwen3vl_client.client import Client
from qwen3vl_client.protocol import EmbedReply, RerankReply, checked
from daemon.loading.tiny import build_tiny_checkpoint

ATOL = 1e-4  # batching changes results by < 2e-5 (tests/test_batching.py)
REPLY_TIMEOUT_S = 60.0
WORDS = "memory server daemon socket batch token vector query document image video rust python".split()


# -- the pool of inputs and their references ---------------------------------------------------------
def _png(seed: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Pool:
    texts: list[str]
    images: list[bytes]  # of several sizes
    frames: list[bytes]  # one video's frames, all of one size
    clip: str
    queries: list[str]
    ref_text: dict = field(default_factory=dict)
    ref_image: dict = field(default_factory=dict)
    ref_frames: np.ndarray | None = None
    ref_clip: np.ndarray | None = None
    ref_score: dict = field(default_factory=dict)

    @classmethod
    def build(cls, media: Path, rng: random.Random) -> "Pool":
        subprocess.run([shutil.which("ffmpeg"), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc=size=96x64:rate=4", "-t", "2", "-pix_fmt", "yuv420p", str(media / "clip.mp4")],
                       check=True)
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + f" #{i}" for i in range(64)]
        return cls(texts, [_png(s, 48 + 8 * s) for s in range(6)], [_png(10 + s, 48) for s in range(3)],
                   str(media / "clip.mp4"), [f"find {w}" for w in WORDS[:4]])

    def compute_references(self, endpoint: str) -> None:
        with Client(endpoint, timeout=120) as c:
            for t in self.texts:
                self.ref_text[t] = c.embed([t]).embeddings[0]
            for i, img in enumerate(self.images):
                self.ref_image[i] = c.embed([{"image": img}]).embeddings[0]
            self.ref_frames = c.embed([{"video": self.frames}]).embeddings[0]
            self.ref_clip = c.embed([{"video": {"path": self.clip}}]).embeddings[0]
            for q in self.queries:
                for t in self.texts:
                    self.ref_score[q, t] = c.rerank(q, [t]).scores[0]


# -- the request mix ---------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str
    payload: dict | bytes
    expect: str  # "ok" or the error code the fault calls for
    check: object = None  # reply -> problem text or None


def _close(got: np.ndarray, want: np.ndarray) -> str | None:
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max())
    return None if err <= ATOL else f"max |diff| {err:.2e} against the reference"


def embed_check(want: list[np.ndarray]):
    return lambda reply: _close(EmbedReply.from_wire(checked(reply)).embeddings, np.stack(want))


def rerank_check(want: list[float]):
    return lambda reply: _close(np.asarray(RerankReply.from_wire(checked(reply)).scores), np.asarray(want))


BAD_REQUESTS = [  # (payload, the code its fault calls for)
    ({"op": "embed", "inputs": []}, "invalid_request"),
    ({"op": "embed", "inputs": ["fine", {"image": b"\x89PNG\r\n\x1a\n broken"}]}, "input_error"),
    ({"op": "embed", "inputs": [{"video": b"not a video file" * 20}]}, "input_error"),
    ({"op": "embed", "inputs": ["a <|image_pad|> b"]}, "input_error"),
    ({"op": "embed", "inputs": [{"image": {"path": "/etc/passwd"}}]}, "invalid_request"),
    ({"op": "rerank", "query": "q", "documents": ["x"] * 1025}, "too_large"),
    ({"op": "embed", "inputs": ["x"], "dimension": 4096}, "invalid_request"),
    ({"op": "transmogrify"}, "unsupported"),
    (b"\xc1 not msgpack", "invalid_request"),
]


def ipc_case(pool: Pool, rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.30:
        texts = rng.sample(pool.texts, rng.randint(1, 8))
        return Case("embed text", {"op": "embed", "inputs": texts}, "ok",
                    embed_check([pool.ref_text[t] for t in texts]))
    if roll < 0.40:
        picks = [rng.randrange(len(pool.images)) for _ in range(rng.randint(1, 3))]
        return Case("embed image", {"op": "embed", "inputs": [{"image": pool.images[i]} for i in picks]}, "ok",
                    embed_check([pool.ref_image[i] for i in picks]))
    if roll < 0.45:
        text = rng.choice(pool.texts)
        return Case("embed video", {"op": "embed", "inputs": [{"video": pool.frames}, text,
                                                                {"video": {"path": pool.clip}}]}, "ok",
                    embed_check([pool.ref_frames, pool.ref_text[text], pool.ref_clip]))
    if roll < 0.65:
        q, docs = rng.choice(pool.queries), rng.sample(pool.texts, rng.randint(1, 12))
        return Case("rerank", {"op": "rerank", "query": q, "documents": docs}, "ok",
                    rerank_check([pool.ref_score[q, d] for d in docs]))
    if roll < 0.70:
        return Case("health", {"op": "health"}, "ok")
    payload, code = rng.choice(BAD_REQUESTS)
    return Case("bad request", payload, code)


# -- clients -----------------------------------------------------------------------------------------
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: collections.Counter = field(default_factory=collections.Counter)
    as_expected: collections.Counter = field(default_factory=collections.Counter)
    latency: dict = field(default_factory=lambda: collections.defaultdict(list))
    problems: list = field(default_factory=list)

    def record(self, kind: str, seconds: float, problem: str | None) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.latency[kind].append(seconds)
            if problem is None:
                self.as_expected[kind] += 1
            else:
                self.problems.append(f"{kind}: {problem}")


def ipc_client(endpoint: str, pool: Pool, seed: int, stop: float, tally: Tally) -> None:
    rng = random.Random(seed)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    n = 0
    while time.monotonic() < stop:
        case, n = ipc_case(pool, rng), n + 1
        tag = f"{seed}:{n}".encode()
        data = case.payload if isinstance(case.payload, bytes) else msgpack.packb({**case.payload, "id": n})
        start = time.perf_counter()
        sock.send_multipart([tag, b"", data])
        if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            tally.record(case.kind, time.perf_counter() - start, f"no reply in {REPLY_TIMEOUT_S:g} s")
            continue
        frames = sock.recv_multipart()
        tally.record(case.kind, time.perf_counter() - start, judge_ipc(case, tag, frames))
    if sock.poll(1000):
        tally.problems.append(f"client {seed}: a reply arrived after its last request was answered")
    sock.close()


def judge_ipc(case: Case, tag: bytes, frames: list[bytes]) -> str | None:
    if frames[0] != tag:
        return f"reply tagged {frames[0]!r} reached request {tag!r}"
    reply = msgpack.unpackb(frames[-1])
    got = "ok" if reply["ok"] else reply["error"]["code"]
    if got != case.expect:
        return f"expected {case.expect}, got {got}: {reply.get('error')}"
    return case.check(reply) if case.check and reply["ok"] else None


def http_client(url: str, pool: Pool, seed: int, stop: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=REPLY_TIMEOUT_S) as http:
        while time.monotonic() < stop:
            roll = rng.random()
            start = time.perf_counter()
            if roll < 0.5:
                texts = rng.sample(pool.texts, rng.randint(1, 8))
                r = http.post("/embed", json={"texts": texts})
                problem = (f"status {r.status_code}" if r.status_code != 200 else
                           _close(np.asarray(r.json()["embeddings"], dtype=np.float32),
                                  np.stack([pool.ref_text[t] for t in texts])))
                kind = "http embed"
            elif roll < 0.8:
                q, docs = rng.choice(pool.queries), rng.sample(pool.texts, rng.randint(1, 12))
                r = http.post("/rerank", json={"query": q, "documents": docs})
                problem = (f"status {r.status_code}" if r.status_code != 200 else
                           _close(np.asarray(r.json()["scores"]), np.asarray([pool.ref_score[q, d] for d in docs])))
                kind = "http rerank"
            else:
                body, want = rng.choice([(b"{not json", 422), (b'{"texts": "not a list"}', 422),
                                         (b'{"texts": ["a <|image_pad|> b"]}', 422)])
                r = http.post("/embed", content=body, headers={"content-type": "application/json"})
                problem = None if r.status_code == want else f"expected {want}, got {r.status_code}: {r.text[:200]}"
                kind = "http bad request"
            tally.record(kind, time.perf_counter() - start, problem)


# -- the run -----------------------------------------------------------------------------------------
def sample_memory(pids: dict[str, int], stop: float, started: float, samples: list) -> None:
    while time.monotonic() < stop:
        samples.append((time.monotonic() - started, {name: rss_kib(pid) for name, pid in pids.items()}))
        time.sleep(2.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=16, help="all clients, the HTTP ones included")
    parser.add_argument("--http-clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        work = Path(tmp)
        (work / "media").mkdir()
        pool = Pool.build(work / "media", random.Random(args.seed))
        endpoint = servers.daemon(work, "daemon", build_tiny_checkpoint(work / "tiny"), "--allow-path",
                                  str(work / "media"))
        url = servers.bridge(work, "bridge", endpoint)
        pool.compute_references(endpoint)
        pids = {"daemon": servers.by_name["daemon"].pid, "bridge": servers.by_name["bridge"].pid}
        tally, samples = Tally(), []
        started = time.monotonic()
        stop = started + args.seconds
        threads = [threading.Thread(target=sample_memory, args=(pids, stop, started, samples))]
        for k in range(args.clients):
            target = http_client if k < args.http_clients else ipc_client
            threads.append(threading.Thread(target=target, args=(url if k < args.http_clients else endpoint,
                                                                 pool, args.seed * 1000 + k, stop, tally)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        alive = servers.by_name["daemon"].poll() is None and servers.by_name["bridge"].poll() is None
    report(args, tally, samples, elapsed, alive)
    return 0 if alive and not tally.problems else 1


def report(args, tally: Tally, samples: list, elapsed: float, alive: bool) -> None:
    total = sum(tally.sent.values())
    print(f"soak: {args.clients} clients ({args.http_clients} over HTTP) for {elapsed:.0f} s, seed {args.seed}, "
          f"{os.cpu_count()} CPUs: {total} requests, {total / elapsed:.0f}/s")
    print(f"{'kind':<18}{'sent':>8}{'as expected':>13}{'p50 ms':>9}{'p99 ms':>9}")
    for kind in sorted(tally.sent):
        lat = np.asarray(tally.latency[kind]) * 1000
        print(f"{kind:<18}{tally.sent[kind]:>8}{tally.as_expected[kind]:>13}"
              f"{np.percentile(lat, 50):9.2f}{np.percentile(lat, 99):9.2f}")
    print(f"problems: {len(tally.problems)}; daemon and bridge alive at the end: {alive}")
    for problem in tally.problems[:20]:
        print(f"  {problem}")
    warm = next(i for i, (t, _) in enumerate(samples) if t >= min(60.0, elapsed * 0.2))
    for name in samples[0][1]:
        series = [s[name] / 1024 for _, s in samples]
        print(f"{name} RSS: {series[0]:.0f} MiB at the start, {series[warm]:.1f} MiB after warm-up "
              f"({samples[warm][0]:.0f} s), {series[-1]:.1f} MiB at the end, max {max(series[warm:]):.1f}: "
              f"{series[-1] - series[warm]:+.1f} MiB after warm-up")
    minutes = [s for s in samples if int(s[0]) % 60 < 2]
    print("per minute: " + ", ".join(f"{t / 60:.0f} min {s['daemon'] / 1024:.0f}/{s['bridge'] / 1024:.0f} MiB"
                                     for t, s in minutes))


if __name__ == "__main__":
    sys.exit(main())
