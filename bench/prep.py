"""How preparing images scales with preparation threads: the vision path against the processor's.

    .venv/bin/python -m bench.prep [--images 96] [--repeats 3]

In process, on a tiny checkpoint with Qwen3's own tokenizer (preparing does not depend on the
model's size): the same image+caption inputs (448x448 JPEGs, and a mix of photo sizes that mostly
need resizing), each prepared once per round by a pool of 1 and then 2 threads, as the daemon's
`--prep-workers` threads prepare them, the image cache off. Both paths are timed in the same run:
the processor's (`fast=False`: the official processor normalises and patches on the host, and the
batch concatenates its float32 pixels) and the vision path's (resized uint8 frames; the batch's
patches written once, on the host here, on the device on an accelerator). Best of `--repeats`
rounds. Prints inputs prepared per second by 1 and 2 threads (the speed-up is the share of the
work that runs with the GIL released, which a second thread can use) and the host's collation
rate (the model thread's share, serial).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.emulated import MIXED_SIZES, jpeg, sentences
from daemon.config import MediaPolicy, ModelSettings
from qwen3vl_client.limits import Limits
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import parse_input
from daemon.loading.tiny import TinySpec, build_tiny_checkpoint


def inputs(count: int, mixed: bool, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        size = MIXED_SIZES[rng.integers(len(MIXED_SIZES))] if mixed else (448, 448)
        wire = {"image": jpeg(rng, *size), "text": sentences(rng, 1, 6, 16)[0]}
        out.append(parse_input(wire, f"inputs[{i}]", Limits(), MediaPolicy()))
    return out


def rate(model, items: list, workers: int, fast: bool, repeats: int) -> tuple[float, float]:
    """(inputs per second prepared by a pool of `workers` threads, inputs per second collated in
    batches of 16 on one thread, as the model thread collates), best of `repeats` each."""
    prepare = collate = float("inf")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            prepared = list(pool.map(lambda item: model.prepare(item, fast=fast), items))
            middle = time.perf_counter()
            for k in range(0, len(prepared), 16):
                model._collate(prepared[k:k + 16])
            prepare, collate = min(prepare, middle - start), min(collate, time.perf_counter() - middle)
    return len(items) / prepare, len(items) / collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from daemon.models import EmbeddingModel

    torch.set_num_threads(1)  # the prep threads are the parallelism measured here
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(Path(tmp) / "ckpt", TinySpec(tokenizer="qwen3"))
        model = EmbeddingModel(ModelSettings(str(ckpt), dtype="float32", max_length=100000),
                               MediaReader(MediaPolicy()))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.images} image+caption inputs; "
              f"best of {args.repeats}; vision path on: {model.vision}\n")
        print("| images | path | prepared, 1 thread (inputs/s) | prepared, 2 threads | 2 threads / 1 | "
              "collated on the host, 1 thread (inputs/s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for mixed in (False, True):
            items = inputs(args.images, mixed)
            for fast, name in ((False, "processor"), (True, "vision path")):
                (one, collated), (two, _) = (rate(model, items, workers, fast, args.repeats) for workers in (1, 2))
                print(f"| {'mixed sizes' if mixed else '448x448 JPEG'} | {name} | {one:.0f} | {two:.0f} | "
                      f"{two / one:.2f}x | {collated:.0f} |")


if __name__ == "__main__":
    main()
