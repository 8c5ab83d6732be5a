"""Weight formats on the Qwen3-VL-2B shapes: memory, time to READY, speed and numerical cost.

    .venv/bin/python -m bench.weights [--checkpoint DIR] [--skip-kernels] [--skip-vision]

Random weights (no trained checkpoint can be fetched here), so every cosine below is a numerical
check of the quantized arithmetic on random weights, not a retrieval-quality claim; random weights
are a harsh proxy for 4-bit error (trained layers' weights are closer to the normal NF4 assumes).

Builds the 2B-shaped checkpoint (bf16, Qwen3's tokenizer, as bench.startup does) unless given one,
then in one run:
1. kernels: one linear layer of each 2B shape (1024 tokens) in float32, bfloat16, torchao int8
   weight-only and nf4 (and bitsandbytes' int8 and nf4 when installed): the library choice;
2. formats: for each (format, dtype) a daemon with both models on the checkpoint: time to READY,
   a mixed load (texts of 4 lengths, an image, a 4-frame video, a 13-document rerank), then one
   32-text request (one forward), the daemon's resident memory after both, and each model's bytes
   as measured and as estimated before loading. Numerical cost against the unquantized model in
   the same dtype: least and mean cosine over the mixed inputs, Spearman correlation of the rerank
   scores;
3. vision: the vision tower's linear layers quantized too (in-process, embedding model in bf16):
   the image and video cosine against the exact tower, and the bytes it would save.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers, gradient_png, rss_kib, wait_daemon_ready
from bench.run import sample_texts
from qwen3vl_client.client import Client
from daemon.loading.fingerprint import DigestCache, fingerprint_directory
from daemon.loading.tiny import QWEN3VL_2B_SPEC, build_tiny_checkpoint

CONFIGS = [("none", "float32"), ("none", "bfloat16"), ("int8", "bfloat16"), ("nf4", "bfloat16")]
SHAPES = [(6144, 2048), (2048, 6144), (2048, 2048)]  # (out, in): gate/up, down, q/o


def mixed_inputs() -> list:
    texts = sample_texts(3, seed=11, lo=6, hi=10) + sample_texts(1, seed=12, lo=40, hi=41) + \
        sample_texts(1, seed=13, lo=400, hi=401)
    frames = [gradient_png(20 + i, size=(224, 160)) for i in range(4)]
    return [*texts, {"text": "with an instruction", "instruction": "Find the passage."},
            {"image": gradient_png(7, size=(448, 336))}, {"video": frames}]


def rerank_set() -> tuple[str, list]:
    docs = sample_texts(12, seed=21, lo=5, hi=60) + [{"image": gradient_png(9, size=(320, 240))}]
    return "which passage is about the market", docs


# -- 1. kernels ------------------------------------------------------------------------------------
def kernels() -> None:
    import torch
    import torch.nn.functional as F

    from daemon.loading.weights import _quantize, to_nf4

    def timed(fn, runs=5) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(runs):
            fn()
        return (time.perf_counter() - began) / runs * 1000

    print("\n1. one linear layer, 1024 tokens, ms (torch threads: %d)" % torch.get_num_threads())
    print("| out x in | float32 | bfloat16 | torchao int8 (f32 act) | torchao int8 (bf16 act) | nf4 (f32 act) "
          "| bnb int8 | bnb nf4 |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for out, inp in SHAPES:
        w, x = torch.randn(out, inp) * 0.02, torch.randn(1024, inp)
        wb, xb = w.bfloat16(), x.bfloat16()
        row = [timed(lambda: F.linear(x, w)), timed(lambda: F.linear(xb, wb))]
        layers = []
        for dtype in (torch.float32, torch.bfloat16):
            layer = torch.nn.Linear(inp, out, bias=False, dtype=dtype)
            layer.weight.data = w.to(dtype)
            _quantize(layer, "int8")
            layers.append((layer, x.to(dtype)))
        nf4 = to_nf4(w)
        with torch.inference_mode():
            row += [timed(lambda: layer(xd)) for layer, xd in layers]
            row.append(timed(lambda: F.linear(x, nf4)))
            row += bnb_times(w, x, timed)
        print(f"| {out} x {inp} | " + " | ".join(f"{t:.0f}" if t is not None else "n/a" for t in row) + " |")


def bnb_times(w, x, timed) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return [None, None]
    out, inp = w.shape
    l8 = bnb.nn.Linear8bitLt(inp, out, bias=False, has_fp16_weights=False)
    l8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    l4 = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=w.dtype, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
    return [timed(lambda: l8.to("cpu")(x), 2), timed(lambda: l4.to("cpu")(x), 2)]


# -- 2. formats through the daemon -----------------------------------------------------------------
def run_config(servers: Servers, work: Path, ckpt: Path, fmt: str, dtype: str, cache: Path) -> dict:
    name = f"{fmt}-{dtype}"
    endpoint = f"ipc://{work}/{name}/daemon.sock"
    began = time.monotonic()
    proc = servers.spawn([sys.executable, "-m", "daemon", "serve", "--endpoint", endpoint, "--embedding-model",
                          str(ckpt), "--reranker-model", str(ckpt), "--log-level", "error", "--dtype", dtype,
                          "--quantize", fmt, "--fingerprint-cache", str(cache)],
                         name=name, log=work / f"{name}.log", env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    wait_daemon_ready(endpoint, proc, timeout_s=900)
    ready = time.monotonic() - began
    with Client(endpoint, timeout=900) as client:
        vectors = client.embed(mixed_inputs()).embeddings
        query, docs = rerank_set()
        scores = np.asarray(client.rerank(query, docs).scores)
        texts = sample_texts(32, seed=5, lo=20, hi=40)
        t0 = time.monotonic()
        client.embed(texts)
        forward = time.monotonic() - t0
        health = client.health()
    rss = rss_kib(proc.pid) * 1024
    proc.terminate()
    proc.wait(60)
    models = {k: (health[k]["memory_bytes"], health[k]["memory_estimate_bytes"]) for k in ("embedding", "reranker")}
    return {"ready": ready, "forward": forward, "rss": rss, "vectors": vectors, "scores": scores, "models": models,
            "load": health["load"]}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def formats(work: Path, ckpt: Path) -> None:
    cache = work / "fingerprints.json"
    fingerprint_directory(ckpt, DigestCache(cache))  # hashed once here, so no start pays for it
    results = {}
    with Servers() as servers:
        for fmt, dtype in CONFIGS:
            results[(fmt, dtype)] = run_config(servers, work, ckpt, fmt, dtype, cache)
            r = results[(fmt, dtype)]
            print(f"  {fmt}/{dtype}: READY {r['ready']:.1f} s, 32 texts {r['forward']:.1f} s, RSS {r['rss'] / 1e9:.2f} GB",
                  flush=True)
    print("\n2. the pair (embedding + reranker) on the 2B shapes, this CPU")
    print("| weights | dtype | resident (pair) | vs bf16 none | weights held: measured / estimated | READY s | "
          "vs none same dtype | 32 texts s | least cosine | mean cosine | rerank Spearman |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base_rss = results[("none", "bfloat16")]["rss"]
    for (fmt, dtype), r in results.items():
        ref = results[("none", dtype)]
        cos = cosines(r["vectors"], ref["vectors"])
        held = sum(m for m, _ in r["models"].values())
        est = sum(e or 0 for _, e in r["models"].values())
        print(f"| {fmt} | {dtype} | {r['rss'] / 1e9:.2f} GB | {r['rss'] / base_rss:.2f}x | {held / 1e9:.2f} / "
              f"{est / 1e9:.2f} GB | {r['ready']:.1f} | {r['ready'] / ref['ready']:.2f}x | {r['forward']:.1f} | "
              f"{cos.min():.4f} | {cos.mean():.4f} | {spearman(r['scores'], ref['scores']):.4f} |")
    bf16, f32 = results[("none", "bfloat16")], results[("none", "float32")]
    print(f"\nbfloat16 against float32 (both unquantized): least cosine "
          f"{cosines(bf16['vectors'], f32['vectors']).min():.4f}, rerank Spearman "
          f"{spearman(bf16['scores'], f32['scores']):.4f}")


# -- 3. the vision tower ---------------------------------------------------------------------------
def vision(ckpt: Path) -> None:
    import torch

    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem, MediaSource, VideoSource
    from daemon.models import EmbeddingModel
    from daemon.loading.weights import _quantize, is_quantized_layer, tensor_bytes

    model = EmbeddingModel(ModelSettings(str(ckpt), dtype="bfloat16"), MediaReader(MediaPolicy()))
    frames = tuple(MediaSource("bytes", gradient_png(20 + i, size=(224, 160)), f"f{i}") for i in range(4))
    items = [InputItem("image", images=(MediaSource("bytes", gradient_png(7, size=(448, 336)), "i"),)),
             InputItem("video", videos=(VideoSource(frames=frames, where="v"),))]
    exact = model.embed([model.prepare(i) for i in items]).numpy()
    layers = [(n, m) for n, m in model.full_model.named_modules()
              if is_quantized_layer(n, m, include_vision=True) and ".visual." in f".{n}"]
    before = sum(tensor_bytes(m.weight) for _, m in layers)
    originals = {n: m.weight.data.clone() for n, m in layers}
    print("\n3. the vision tower's linear layers quantized too (embedding model, bf16)")
    print("| vision tower | image cosine | video cosine | vision linear bytes |")
    print("|---|---|---|---|")
    print(f"| kept (bf16) | 1.0000 | 1.0000 | {before / 1e9:.3f} GB |")
    for fmt in ("int8", "nf4"):
        with torch.no_grad():
            for name, module in layers:
                module.weight = torch.nn.Parameter(originals[name].clone(), requires_grad=False)
                _quantize(module, fmt)
        got = model.embed([model.prepare(i) for i in items]).numpy()
        cos = cosines(got, exact)
        after = sum(tensor_bytes(m.weight) for _, m in layers)
        print(f"| {fmt} | {cos[0]:.4f} | {cos[1]:.4f} | {after / 1e9:.3f} GB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a 2B-shaped checkpoint (else built)")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-vision", action="store_true")
    args = parser.parse_args()
    from daemon.logs import quiet_libraries

    quiet_libraries()
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}, threads "
          f"{torch.get_num_threads()}; random weights")
    if not args.skip_kernels:
        kernels()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.checkpoint or build_tiny_checkpoint(work / "ckpt", replace(QWEN3VL_2B_SPEC, tokenizer="qwen3",
                                                                               dtype="bfloat16"))
        formats(work, ckpt)
        if not args.skip_vision:
            vision(ckpt)


if __name__ == "__main__":
    main()
