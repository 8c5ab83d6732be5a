"""Where a CPU forward stops gaining from a larger batch: the default `--max-batch-tokens` on a CPU.

    .venv/bin/python -m bench.cpu_batch [--checkpoint DIR] [--skip-forward]

In one run, on this host, in the dtype `--dtype auto` picks on it (bfloat16 where the CPU has native
bf16, AVX512-BF16 or AMX; else float32: emulated bf16 runs at a fraction of a GFLOP/s):
1. matmul: (M x 2048) @ (2048 x 6144), the 2B language model's gate/up shape, for M from 16 to 4096
   rows: GFLOP/s (best of 3), in float32 and, where native, bfloat16;
2. forward: the embedding model on the 2B shapes (random weights, Qwen3's tokenizer, built as
   bench.weights builds it unless given), batches of 128-token texts from 128 to 4096 padded
   tokens: tokens/s and the forward's time, which is what a query waits when it arrives behind
   such a forward without preemption.

A batch larger than where the tokens/s stop rising buys nothing and makes everything behind it
wait longer; the daemon's CPU default (CPU_BATCH_TOKENS, daemon/engine/batching.py) is set from
this table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOKENS = (128, 256, 512, 1024, 2048, 4096)
TEXT_TOKENS = 128


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def matmuls(dtypes: list) -> None:
    print("matmul (M x 2048) @ (2048 x 6144), GFLOP/s (best of 3)")
    print(f"{'M':>6} " + " ".join(f"{str(d).replace('torch.', ''):>10}" for d in dtypes))
    for m in ROWS:
        row = []
        for dtype in dtypes:
            x, w = torch_randn(m, 2048, dtype), torch_randn(2048, 6144, dtype)
            x @ w
            seconds = best(lambda: x @ w, 3)
            row.append(2 * m * 2048 * 6144 / seconds / 1e9)
        print(f"{m:>6} " + " ".join(f"{v:>10.0f}" for v in row), flush=True)


def torch_randn(rows: int, cols: int, dtype):
    import torch

    return torch.randn(rows, cols, dtype=dtype)


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


def forwards(ckpt: Path, dtype: str) -> None:
    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(str(ckpt), dtype=dtype), MediaReader(MediaPolicy()))
    texts = texts_of(model.tokenizer, max(TOKENS) // TEXT_TOKENS)
    prepared = [model.prepare(InputItem(f"inputs[{i}]", texts=(t,))) for i, t in enumerate(texts)]
    width = max(p.tokens for p in prepared)
    print(f"\nforward: embedding model, 2B shapes, {dtype}; texts of {width} tokens with the template "
          "(padded tokens = texts x that)")
    print(f"{'padded tokens':>14} {'texts':>6} {'forward s':>10} {'tokens/s':>9}")
    model.embed(prepared[:1])
    for tokens in TOKENS:
        count = max(1, tokens // TEXT_TOKENS)
        batch = prepared[:count]
        seconds = best(lambda: model.embed(batch), 2 if count <= 4 else 1)
        print(f"{count * width:>14} {count:>6} {seconds:>10.2f} {count * width / seconds:>9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args()
    import torch

    from daemon.loading.devices import cpu_has_native_bf16, resolve_dtype

    dtype = str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ISA "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}: --dtype auto is {dtype}")
    matmuls([torch.float32, *([torch.bfloat16] if cpu_has_native_bf16() else [])])
    if args.skip_forward:
        return
    if args.checkpoint is not None:
        forwards(args.checkpoint, dtype)
        return
    from daemon.loading.tiny import QWEN3VL_2B_SPEC, build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        forwards(build_tiny_checkpoint(Path(tmp) / "ckpt", replace(QWEN3VL_2B_SPEC, tokenizer="qwen3",
                                                                   dtype="bfloat16")), dtype)


if __name__ == "__main__":
    main()
