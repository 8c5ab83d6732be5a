"""What model fingerprints cost at start, on the Qwen3-VL-2B shapes.

    .venv/bin/python -m bench.fingerprint [--checkpoint DIR] [--runs 3]

Builds the 2B-shaped random-weight checkpoint (bf16, Qwen3's tokenizer; as bench.startup does) unless
given one, then measures, with the files in the page cache (as right after a load):
- in process: a first start (no digest cache: every file is read and hashed), a repeated start (the
  digest cache answers), the same files laid out as a hub snapshot (links to blobs named by their
  sha256, each read once and checked against its name) on a first and a repeated start, and the
  check after loading that every file is unchanged;
- the daemon (both models on the checkpoint): `health`'s `load.fingerprint_s` and `total_s` on a first
  start with an empty digest cache, then on a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import Servers
from qwen3vl_client.client import Client
from daemon.loading.fingerprint import DigestCache, fingerprint_directory
from daemon.loading.tiny import QWEN3VL_2B_SPEC, build_tiny_checkpoint


def hub_snapshot(ckpt: Path, hub: Path, repo: str = "org/model") -> Path:
    """`ckpt` cached as huggingface_hub caches repo `repo` under `hub`: `refs/main` names a snapshot
    whose files link to blobs, named by sha256 for LFS files (the weights) and by git's blob sha1 for
    the others. The blobs are hard links to `ckpt`'s files (no copy of the weights)."""
    base, revision = hub / f"models--{repo.replace('/', '--')}", "0" * 40
    blobs, snapshot = base / "blobs", base / "snapshots" / revision
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    for f in ckpt.iterdir():
        data = f.read_bytes()
        digest = (hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors"
                  else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        os.link(f, blobs / digest)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def timed(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.monotonic()
        result = fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times), result


def daemon_start(servers: Servers, work: Path, name: str, ckpt: Path, cache: Path) -> dict:
    endpoint = servers.daemon(work, name, ckpt, "--fingerprint-cache", str(cache))
    with Client(endpoint, timeout=60) as c:
        load = c.health()["load"]
    servers.by_name[name].terminate()
    servers.by_name[name].wait(60)
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-fp-"))
    ckpt = args.checkpoint or build_tiny_checkpoint(work / "ckpt", QWEN3VL_2B_SPEC)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    fingerprint_directory(ckpt, DigestCache(None))  # the files into the page cache, as after a load

    first, found = timed(lambda: fingerprint_directory(ckpt, DigestCache(None)), args.runs)
    cache = work / "warm.json"
    fingerprint_directory(ckpt, DigestCache(cache))
    repeated, _ = timed(lambda: fingerprint_directory(ckpt, DigestCache(cache)), args.runs)
    snapshot = hub_snapshot(ckpt, work / "hub")
    hub, hub_found = timed(lambda: fingerprint_directory(snapshot, DigestCache(None)), args.runs)
    hub_cache = work / "hub.json"
    fingerprint_directory(snapshot, DigestCache(hub_cache))
    hub_repeated, _ = timed(lambda: fingerprint_directory(snapshot, DigestCache(hub_cache)), args.runs)
    # The snapshot's hard links changed the files' ctime: the check is timed on a fingerprint made since.
    check, _ = timed(fingerprint_directory(ckpt, DigestCache(None)).check_unchanged, args.runs)
    assert hub_found.value == found.value
    print(f"checkpoint {ckpt}: {found.files} files, {size / 1e9:.2f} GB, fingerprint {found.value}")
    print(f"in process, median of {args.runs}, files in the page cache:")
    print(f"  first start (hash every file)      {first:8.3f} s  ({size / first / 1e9:.2f} GB/s)")
    print(f"  repeated start (digest cache)      {repeated * 1000:8.1f} ms")
    print(f"  hub snapshot, first start          {hub:8.3f} s  (hashed {hub_found.hashed_bytes / 1e9:.2f} GB: "
          "every blob checked against its name)")
    print(f"  hub snapshot, repeated start       {hub_repeated * 1000:8.1f} ms")
    print(f"  unchanged check after loading      {check * 1000:8.3f} ms")
    with Servers() as servers:
        cold = daemon_start(servers, work, "daemon", ckpt, work / "daemon.json")
        warm = daemon_start(servers, work, "daemon", ckpt, work / "daemon.json")
    print("daemon, both models on the checkpoint (health's load map):")
    for name, load in (("first start", cold), ("restart", warm)):
        print(f"  {name:<14} fingerprint {load['fingerprint_s']:6.3f} s of {load['total_s']:5.1f} s to ready "
              f"(weights {load['weights_s']:.1f} s)")


if __name__ == "__main__":
    main()
