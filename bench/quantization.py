"""What compact embeddings keep of float32 search: top-10 overlap, int8 and binary against float32.

    .venv/bin/python -m bench.quantization [--docs 3000] [--queries 200] [--checkpoint DIR]

A numerical check of the quantizers on a random-weight model's vectors, not a retrieval-quality
claim: the daemon embeds `--docs` documents and `--queries` queries (random word sequences, Qwen3's
tokenizer) on a random-weight checkpoint (default: 512 hidden, 6 layers), as float32, int8 with the
fixed scale, int8 calibrated on a separate sample of 1000 texts (`qwen3vl-daemon calibrate`'s own
code), and ubinary. For each query the top 10 documents by float32 cosine are compared with the top
10 by each compact form: int8 by the dot product of the dequantised vectors, ubinary by Hamming
distance. Printed: mean overlap (|top10 ∩ float top10| / 10), the float32 rank-1 document's presence
in the compact top 10, and bytes per vector.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.harness import Servers
from bench.run import sample_texts
from daemon.outputs.calibrate import calibrate
from qwen3vl_client.client import Client
from daemon.outputs.encodings import Quantizer, dequantize
from daemon.loading.tiny import BENCH_SPEC, build_tiny_checkpoint

K = 10


def embed_all(client: Client, texts: list[str], dimension: int, encoding: str, batch: int = 64):
    parts = [client.embed(texts[i:i + batch], dimension=dimension, encoding=encoding)
             for i in range(0, len(texts), batch)]
    return np.concatenate([p.embeddings for p in parts]), parts[0].quantization


def top_k(scores: np.ndarray) -> np.ndarray:
    """Indices of each row's K best scores (ties by index)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def hamming_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Negative Hamming distance between packed bit rows (higher is closer)."""
    xor = np.bitwise_xor(queries[:, None, :], docs[None, :, :])
    return -np.unpackbits(xor, axis=2).sum(axis=2).astype(np.int32)


def compare(reference: np.ndarray, found: np.ndarray) -> tuple[float, float]:
    overlap = np.mean([len(set(r) & set(f)) / K for r, f in zip(reference, found)])
    first = np.mean([r[0] in set(f) for r, f in zip(reference, found)])
    return float(overlap), float(first)


def measure(client: Client, calibrated: Client, docs: list[str], queries: list[str], dimension: int,
            quantizer: Quantizer) -> list[tuple[str, int, float, float]]:
    d_f, _ = embed_all(client, docs, dimension, "float32")
    q_f, _ = embed_all(client, queries, dimension, "float32")
    reference = top_k(q_f @ d_f.T)
    rows = [("float32", 4 * dimension, 1.0, 1.0)]
    for name, daemon in (("int8, fixed scale", client), ("int8, calibrated", calibrated)):
        d_q, label = embed_all(daemon, docs, dimension, "int8")
        q_q, _ = embed_all(daemon, queries, dimension, "int8")
        scale = quantizer.scale(dimension) if label.startswith("calibrated") else Quantizer().scale(dimension)
        scores = dequantize(q_q, "int8", scale) @ dequantize(d_q, "int8", scale).T
        rows.append((name, dimension, *compare(reference, top_k(scores))))
    d_b, _ = embed_all(client, docs, dimension, "ubinary")
    q_b, _ = embed_all(client, queries, dimension, "ubinary")
    rows.append(("ubinary, Hamming", dimension // 8, *compare(reference, top_k(hamming_scores(q_b, d_b)))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random 512-hidden checkpoint")
    parser.add_argument("--dimension", type=int, action="append", help="output dimensions (default: full and 128)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-quant-"))
    ckpt = args.checkpoint or build_tiny_checkpoint(work / "ckpt", replace(BENCH_SPEC, tokenizer="qwen3"))
    docs, queries = sample_texts(args.docs, seed=1), sample_texts(args.queries, seed=2, lo=3, hi=12)
    with Servers() as servers:
        endpoint = servers.daemon(work, "plain", ckpt, "--fingerprint-cache", str(work / "fp.json"))
        with Client(endpoint, timeout=600) as client:
            full = client.health()["embedding"]["max_dimension"]
            dims = args.dimension or [full, 128]
            calibration = calibrate(client, sample_texts(1000, seed=3), dims, None)
            calibration.save(work / "int8.json")
            calibrated_ep = servers.daemon(work, "calibrated", ckpt, "--int8-calibration", str(work / "int8.json"),
                                           "--fingerprint-cache", str(work / "fp.json"))
            with Client(calibrated_ep, timeout=600) as calibrated:
                print(f"{args.docs} documents, {args.queries} queries, top-{K}; a random-weight model's vectors "
                      "(a numerical check of the quantizers, not of retrieval quality)")
                print(f"{'dimension':>9}  {'form':<20} {'bytes':>6}  {'top-10 overlap':>14}  {'rank-1 kept':>11}")
                for dimension in dims:
                    for name, size, overlap, first in measure(client, calibrated, docs, queries, dimension,
                                                              Quantizer(calibration)):
                        print(f"{dimension:>9}  {name:<20} {size:>6}  {overlap:>14.3f}  {first:>11.3f}")


if __name__ == "__main__":
    main()
