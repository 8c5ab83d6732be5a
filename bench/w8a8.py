"""The CPU's int8 ceiling: throughput and a lone query's latency for the raw transformers forward and
the daemon in its dtype, int8 (weight-only), w8a8 and float32, with w8a8's numerical cost, one run.

    .venv/bin/python -m bench.w8a8 --checkpoint DIR [--texts-per-client 2] [--queries 7]

DIR: a Qwen3-VL checkpoint (e.g. the 2B shapes with random weights: `python -c "from daemon.loading.tiny
import *; build_tiny_checkpoint('DIR', QWEN3VL_2B_SPEC)"`, or a real one). Rows:
- raw: the transformers model's own forward (the daemon's loader, then `model.model(...)` on the
  same token ids), in a process of its own: one text of ~35 tokens (p50), and all the clients'
  texts (~150 tokens each) in one padded forward; in w8a8 too (the one text only);
- per format, a daemon (embedding model only): 8 clients at once, each one request of
  `--texts-per-client` texts (tokens/s), then the one text alone (p50 of `--queries`, idle);
- the cost: least and mean cosine of each format's embeddings to the dtype's over a mixed set
  (texts of 3 to ~400 tokens, two images), the rerank Spearman of 16 documents (a reranker daemon per
  format), and the per-layer check: each w8a8 layer against its exact layer on the model's own
  activations (worst relative error);
- where a w8a8 forward's time goes (torch.profiler, in-process): int8 matmuls, per-token
  quantizing, attention, the rest.
bfloat16 rows only where the CPU computes bf16 natively (`--dtype auto` picks it); elsewhere bf16 is
emulated and not worth a row (printed with the reason). On a CUDA machine the same rows run there
(the daemons' `--device auto`), with fp8 beside w8a8 on compute capability 8.9+. Ratios are within
this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT, Servers, gradient_png
from bench.run import WORDS
from bench.weights import cosines, spearman
from qwen3vl_client.client import Client

QUERY = "which local daemon embeds the memory server's text and image documents for vector search"


def bulk_texts(n: int, words: int = 110, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


def mixed_inputs() -> list:
    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(WORDS, n)) for n in (2, 9, 30, 80, 160, 300)]
    return [*texts, QUERY, {"image": gradient_png(1)}, {"image": gradient_png(4)}]


# -- the raw forward, in its own process ---------------------------------------------------------
def raw(args) -> dict:
    import torch

    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel
    from daemon.loading.w8a8 import linear_class
    from daemon.loading.weights import is_quantized_layer

    model = EmbeddingModel(ModelSettings(args.checkpoint, dtype=args.dtype), MediaReader(MediaPolicy()))
    ids = [model.prepare(InputItem(f"inputs[{i}]", texts=(t,))).input_ids
           for i, t in enumerate([QUERY, *bulk_texts(args.clients * args.texts_per_client)])]

    forward(model, ids[:1])
    one = [forward(model, ids[:1]) for _ in range(args.queries)]
    bulk = forward(model, ids[1:])
    worst = layer_check(model, torch, linear_class, is_quantized_layer, InputItem)
    return {"query_tokens": len(ids[0]), "bulk_tokens": sum(map(len, ids[1:])), "one_p50": statistics.median(one),
            "one": one, "bulk_s": bulk, "layer_worst": worst}


def forward(model, rows: list[list[int]]) -> float:
    """Seconds of the transformers model's own forward of token id `rows` (right-padded)."""
    import torch

    width = max(map(len, rows))
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    start = time.perf_counter()
    with torch.inference_mode():
        model.model(input_ids=x, attention_mask=mask)
    return time.perf_counter() - start


def layer_check(model, torch, linear_class, is_quantized_layer, InputItem) -> list:
    """Each language-model linear layer in w8a8 against itself on the activations of a mixed input."""
    seen = {}
    layers = {n: m for n, m in model.full_model.named_modules() if is_quantized_layer(n, m)}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach())) for n, m in layers.items()]
    try:
        model.embed([model.prepare(InputItem("inputs[0]", texts=(QUERY + " " + " ".join(bulk_texts(1)),)))])
    finally:
        for hook in hooks:
            hook.remove()
    errors = {}
    with torch.inference_mode():
        for name, x in seen.items():
            want = layers[name](x)
            errors[name] = float((linear_class()(layers[name], x.device)(x) - want).norm() / want.norm())
    worst = max(errors, key=errors.get)
    return [worst, errors[worst], statistics.mean(errors.values())]


# Self CPU time of a w8a8 forward by what it does (torch.profiler's op names).
GROUPS = (("int8 matmuls (fbgemm)", ("quantized::",)),
          ("per-token quantizing", ("aten::amax", "aten::round", "aten::clamp", "aten::div", "aten::abs")),
          ("attention (sdpa, softmax, bmm)", ("attention", "aten::_softmax", "aten::bmm", "aten::baddbmm")))


def profile(args) -> dict:
    """Where a w8a8 forward's time goes, for the one text and for the bulk texts in one batch."""
    from torch.profiler import ProfilerActivity, profile as profiler

    from daemon.config import MediaPolicy, ModelSettings
    from daemon.inputs.media_reader import MediaReader
    from qwen3vl_client.inputs import InputItem
    from daemon.models import EmbeddingModel

    model = EmbeddingModel(ModelSettings(args.checkpoint, dtype=args.dtype, quantize="w8a8"), MediaReader(MediaPolicy()))
    one = [model.prepare(InputItem("inputs[0]", texts=(QUERY,)))]
    bulk = [model.prepare(InputItem(f"inputs[{i}]", texts=(t,))) for i, t in enumerate(bulk_texts(8))]
    forward(model, [one[0].input_ids])
    raw_one = [forward(model, [one[0].input_ids]) for _ in range(args.queries)]
    found = {"raw_one_p50": statistics.median(raw_one), "raw_one": raw_one}
    for label, batch in (("one text", one), ("8 bulk texts", bulk)):
        model.embed(batch)
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model.embed(batch)
            wall = time.perf_counter() - start
        times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(times.values())
        shares = {group: sum(t for k, t in times.items() if any(n in k for n in names)) / total
                  for group, names in GROUPS}
        shares["everything else"] = 1 - sum(shares.values())
        found[label] = {"wall_s": wall, "shares": shares}
    return found


# -- daemons ---------------------------------------------------------------------------------------
def through_daemon(servers: Servers, work: Path, name: str, args, extra: list[str], texts: list[str]) -> dict:
    endpoint = servers.daemon(work, name, Path(args.checkpoint), "--reranker-model", "none", "--max-batch-size",
                              "64", *extra)
    found = {}
    with Client(endpoint, timeout=3600) as c:
        c.embed([QUERY + " warm"])
        per = args.texts_per_client
        done = []

        def client(k: int) -> None:
            with Client(endpoint, timeout=3600) as own:
                own.embed(texts[k * per:(k + 1) * per])
            done.append(k)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        found["bulk_s"] = time.perf_counter() - start
        assert len(done) == args.clients
        one = []
        for i in range(args.queries):
            t0 = time.perf_counter()
            c.embed([QUERY], instruction=f"Query {i}")  # distinct each time: never from the cache
            one.append(time.perf_counter() - t0)
        found["one_p50"], found["one"] = statistics.median(one), one
        found["vectors"] = np.asarray(c.embed(mixed_inputs()).embeddings, dtype=np.float64)
    servers.close()
    reranker = servers.daemon(work, name + "-r", Path(args.checkpoint), "--embedding-model", "none", *extra)
    with Client(reranker, timeout=3600) as c:
        found["scores"] = np.asarray(c.rerank(QUERY, bulk_texts(16, words=30, seed=3)).scores)
    servers.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--texts-per-client", type=int, default=2)
    parser.add_argument("--queries", type=int, default=7)
    parser.add_argument("--dtype", default=None, help="the reference dtype (default: what --dtype auto picks)")
    parser.add_argument("--phase", choices=["raw", "profile"], help=argparse.SUPPRESS)  # in a process of its own
    args = parser.parse_args()
    if args.phase:
        print(json.dumps((raw if args.phase == "raw" else profile)(args)))
        return
    import torch

    from daemon.loading.devices import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the daemons' `auto` puts them
    args.dtype = args.dtype or str(resolve_dtype("auto", device)).replace("torch.", "")
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    del torch
    measured = phase("raw", args)
    rows = {f"raw transformers {args.dtype}": {"one_p50": measured["one_p50"], "bulk_s": measured["bulk_s"],
                                               "one": measured["one"]}}
    configs = {f"daemon {args.dtype}": ["--dtype", args.dtype], f"daemon int8 (weight-only, {args.dtype})":
               ["--dtype", args.dtype, "--quantize", "int8"], f"daemon w8a8 ({args.dtype} between layers)":
               ["--dtype", args.dtype, "--quantize", "w8a8"]}
    if fp8:  # float8 tensor cores beside int8's
        configs[f"daemon fp8 ({args.dtype} between layers)"] = ["--dtype", args.dtype, "--quantize", "fp8"]
    if args.dtype != "float32":
        configs["daemon float32"] = ["--dtype", "float32"]
    texts = bulk_texts(args.clients * args.texts_per_client)
    with tempfile.TemporaryDirectory() as tmp, Servers() as servers:
        for k, (label, extra) in enumerate(configs.items()):
            rows[label] = through_daemon(servers, Path(tmp), f"d{k}", args, extra, texts)
    profiled = phase("profile", args)
    rows[f"raw transformers w8a8 ({args.dtype} between layers)"] = {
        "one_p50": profiled.pop("raw_one_p50"), "one": profiled.pop("raw_one"), "bulk_s": float("nan")}
    report(args, measured, rows, profiled)


def phase(name: str, args) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.w8a8", "--phase", name, "--checkpoint", args.checkpoint,
                          "--clients", str(args.clients), "--texts-per-client", str(args.texts_per_client),
                          "--queries", str(args.queries), "--dtype", args.dtype], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, measured: dict, rows: dict, profiled: dict) -> None:
    tokens = measured["bulk_tokens"]
    base_label = f"daemon {args.dtype}"
    base = rows[base_label]
    raw_one = rows[f"raw transformers {args.dtype}"]["one_p50"]
    print(f"checkpoint {args.checkpoint}; {args.clients} clients x {args.texts_per_client} texts "
          f"({tokens} tokens in all); one text of {measured['query_tokens']} tokens, p50 of {args.queries}")
    if args.dtype == "float32":
        print("bfloat16: no row (this CPU has no native bf16: --dtype auto is float32 here)")
    print(f"{'':44} {'tokens/s':>9} {'vs ' + args.dtype:>10} {'one p50 ms':>11} {'vs raw ' + args.dtype:>16} {'vs dtype':>8}")
    for label, row in rows.items():
        rate = tokens / row["bulk_s"]
        print(f"{label:44} {rate:9.1f} {rate / (tokens / base['bulk_s']):10.2f} {row['one_p50'] * 1e3:11.0f} "
              f"{row['one_p50'] / raw_one:16.2f} {row['one_p50'] / base['one_p50']:8.2f}")
    raw_w8a8 = rows[f"raw transformers w8a8 ({args.dtype} between layers)"]["one_p50"]
    daemon_w8a8 = rows[f"daemon w8a8 ({args.dtype} between layers)"]["one_p50"]
    print(f"lone query, the daemon over the raw forward of the same weights: {args.dtype} "
          f"{base['one_p50'] / raw_one:.2f}, w8a8 {daemon_w8a8 / raw_w8a8:.2f}")
    print("one-text times, ms:")
    for label, row in rows.items():
        print(f"  {label}: {[round(t * 1e3) for t in row['one']]}")
    print(f"cost against {base_label} (mixed set of {len(base['vectors'])} inputs; rerank of 16 documents):")
    for label, row in rows.items():
        if "vectors" not in row or label == base_label:
            continue
        cos = cosines(row["vectors"], base["vectors"])
        print(f"  {label}: cosine least {cos.min():.4f} mean {cos.mean():.4f}; rerank Spearman "
              f"{spearman(row['scores'], base['scores']):.3f}; scores max |diff| "
              f"{np.abs(row['scores'] - base['scores']).max():.4f}")
    name, worst, mean = measured["layer_worst"]
    print(f"per-layer check, w8a8 against the exact layer on the model's own activations: worst {worst:.4f} "
          f"({name}), mean {mean:.4f}")
    print("where a w8a8 forward's time goes (torch.profiler, self CPU time, in-process):")
    for label, found in profiled.items():
        shares = ", ".join(f"{group} {share:.0%}" for group, share in found["shares"].items())
        print(f"  {label} ({found['wall_s'] * 1e3:.0f} ms under the profiler): {shares}")



if __name__ == "__main__":
    main()
