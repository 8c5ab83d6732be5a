"""Where a CPU forward stops gaining from a larger batch: the default `--max-batch-tokens` on a CPU.

    .venv/bin/python -m bench.cpu_batch [--checkpoint DIR] [--skip-forward]

In one run, on this host:
1. matmul: (M x 2048) @ (2048 x 6144), the 2B language model's gate/up shape, in bfloat16 and
   float32, for M from 64 to 4096 rows: GFLOP/s (best of 3);
2. forward: the embedding model on the 2B shapes in bfloat16 (random weights, Qwen3's tokenizer,
   built as bench.weights builds it unless given), batches of 128-token texts from 128 to 4096
   padded tokens: tokens/s (best of 2) and the forward's time, which is what a query waits when it
   arrives behind such a forward without preemption.

A batch larger than where the tokens/s stop rising buys nothing and makes everything behind it
wait longer; the daemon's CPU default (engine.CPU_BATCH_TOKENS) is set from this table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROWS = (64, 128, 256, 512, 1024, 2048, 4096)
TOKENS = (128, 256, 512, 1024, 2048, 4096)
TEXT_TOKENS = 128


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def matmuls() -> None:
    import torch

    print("matmul (M x 2048) @ (2048 x 6144), GFLOP/s (best of 3)")
    print(f"{'M':>6} {'bfloat16':>10} {'float32':>10}")
    for m in ROWS:
        row = []
        for dtype in (torch.bfloat16, torch.float32):
            x, w = torch.randn(m, 2048, dtype=dtype), torch.randn(2048, 6144, dtype=dtype)
            x @ w
            seconds = best(lambda: x @ w, 3)
            row.append(2 * m * 2048 * 6144 / seconds / 1e9)
        print(f"{m:>6} {row[0]:>10.0f} {row[1]:>10.0f}", flush=True)


def texts_of(tokenizer, count: int) -> list[str]:
    """`count` distinct texts of about TEXT_TOKENS tokens each (with the template, a little more)."""
    from bench.run import WORDS

    out = []
    for i in range(count):
        words, text = [], ""
        while len(tokenizer(text)["input_ids"]) < TEXT_TOKENS - 30:
            words.append(WORDS[(i * 7 + len(words) * 13) % len(WORDS)])
            text = " ".join(words)
        out.append(text)
    return out


def forwards(ckpt: Path) -> None:
    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs import InputItem, MediaReader
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(str(ckpt), dtype="bfloat16"), MediaReader(MediaPolicy()))
    texts = texts_of(model.tokenizer, max(TOKENS) // TEXT_TOKENS)
    prepared = [model.prepare(InputItem(f"inputs[{i}]", texts=(t,))) for i, t in enumerate(texts)]
    width = max(p.tokens for p in prepared)
    print(f"\nforward: embedding model, 2B shapes, bfloat16; texts of {width} tokens with the template "
          "(padded tokens = texts x that)")
    print(f"{'padded tokens':>14} {'texts':>6} {'forward s':>10} {'tokens/s':>9}")
    model.embed(prepared[:1])
    for tokens in TOKENS:
        count = max(1, tokens // TEXT_TOKENS)
        batch = prepared[:count]
        seconds = best(lambda: model.embed(batch), 2 if count <= 8 else 1)
        print(f"{count * width:>14} {count:>6} {seconds:>10.2f} {count * width / seconds:>9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ISA {torch.backends.cpu.get_cpu_capability()}")
    matmuls()
    if args.skip_forward:
        return
    if args.checkpoint is not None:
        forwards(args.checkpoint)
        return
    from daemon.tiny import QWEN3VL_2B_SPEC, build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        forwards(build_tiny_checkpoint(Path(tmp) / "ckpt", replace(QWEN3VL_2B_SPEC, tokenizer="qwen3",
                                                                   dtype="bfloat16")))


if __name__ == "__main__":
    main()
