"""Time to READY against transformers' own loading of the same two models.

    .venv/bin/python -m bench.startup [--spec 2b] [--device cpu] [--runs 2]

Builds a random-weight checkpoint (default: the Qwen3-VL-2B shape in bf16, with Qwen3's tokenizer)
once, then alternates, each in a fresh interpreter with a warm page cache:
- baseline: import torch and transformers, then for each of the two models AutoProcessor and
  from_pretrained (the embedding as the base `Qwen3VLModel`, the reranker as
  `Qwen3VLForConditionalGeneration`) and one forward of a short tokenised text;
- daemon: `qwen3vl-daemon serve` with both models from spawn to `health` saying ready, with the
  split the daemon reports (import, weights, warm-up).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers
from qwen3vl_client.client import Client
from daemon.loading.tiny import BENCH_SPEC, QWEN3VL_2B_SPEC, build_tiny_checkpoint

BASELINE = """
import sys, time
t0 = time.monotonic()
import torch, transformers
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration, Qwen3VLModel
path, device = sys.argv[1], sys.argv[2]
dtype = torch.bfloat16 if sys.argv[3] == "bfloat16" else torch.float32
t_import = time.monotonic() - t0
for cls in (Qwen3VLModel, Qwen3VLForConditionalGeneration):
    processor = AutoProcessor.from_pretrained(path)
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = processor.tokenizer(["hello"], return_tensors="pt")
    with torch.inference_mode():
        model(**{k: v.to(device) for k, v in ids.items()})
print(t_import, time.monotonic() - t0)
"""


def baseline(ckpt: Path, device: str, dtype: str) -> tuple[float, float]:
    """(import seconds, total seconds), timed inside a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", BASELINE, str(ckpt), device, dtype], capture_output=True,
                         text=True, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t_import, total = map(float, out.stdout.split()[-2:])
    return t_import, total


def daemon(work: Path, ckpt: Path, device: str, dtype: str) -> tuple[float, dict]:
    with Servers() as servers:
        began = time.monotonic()
        endpoint = servers.daemon(work, "daemon", ckpt, "--device", device, "--dtype", dtype)
        ready = time.monotonic() - began
        with Client(endpoint) as client:
            split = client.health().get("load") or {}
    return ready, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", choices=("2b", "bench"), default="2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of building one")
    args = parser.parse_args()
    spec = replace(QWEN3VL_2B_SPEC if args.spec == "2b" else BENCH_SPEC, tokenizer="qwen3", dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        ckpt = args.checkpoint or build_tiny_checkpoint(work / "ckpt", spec)
        print(f"checkpoint ({args.spec}, {args.dtype}) ready in {time.monotonic() - t0:.0f} s", flush=True)
        baseline(ckpt, args.device, args.dtype)  # warms the page cache
        base, ready = [], []
        for run in range(args.runs):
            base.append(baseline(ckpt, args.device, args.dtype))
            seconds, split = daemon(work, ckpt, args.device, args.dtype)
            ready.append(seconds)
            print(f"run {run + 1}: baseline {base[-1][1]:.1f} s (import {base[-1][0]:.1f} s); "
                  f"daemon READY {seconds:.1f} s, split {split}", flush=True)
    b, r = float(np.median([t for _, t in base])), float(np.median(ready))
    print(f"median: daemon READY {r:.1f} s / baseline {b:.1f} s = {r / b:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
