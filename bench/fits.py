"""What fits where: the 2B and 8B pairs' memory in each dtype and weight format, computed.

    .venv/bin/python -m bench.fits [--batch-tokens 8192]

No weights are needed: each model is built on torch's meta device from the published Qwen3-VL
shapes (below), and its parameters are counted by the same estimate the daemon's start uses
(daemon/loading/fit.py, from a checkpoint's safetensors headers). Printed per pair: the weights held once
loaded, the working memory of one batch of `--batch-tokens` (the engine runs one batch at a time,
so a rerank queued behind an embed adds no activations, only its token ids on the host), and the
peak while loading, where the 8B reranker's untied LM head (151936 x 4096) is held until the
score vector is taken from it.
"""

from __future__ import annotations

import argparse

from daemon.loading.fit import Plan, Shape, estimate, size

# The published configs' shapes (Qwen3-VL-2B / -8B; the Embedding and Reranker releases share them).
SHAPES = {
    "2B": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[5, 11, 17]), tie=True),
    "8B": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]), tie=False),
}
CARDS = (16e9, 24e9, 32e9, 48e9, 80e9)


def shape_of(name: str) -> tuple[Shape, int]:
    """The model's Shape (as fit.checkpoint_shape reads a checkpoint) and its LM head's elements."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    spec = SHAPES[name]
    config = Qwen3VLConfig(text_config=spec["text"], vision_config={**spec["vision"], "patch_size": 16,
                                                                    "spatial_merge_size": 2, "temporal_patch_size": 2,
                                                                    "num_position_embeddings": 2304},
                           tie_word_embeddings=spec["tie"])
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    tensors = tuple((n, "BF16", p.numel(), p.shape[0] if p.dim() else 1) for n, p in model.named_parameters())
    head = 0 if spec["tie"] else model.lm_head.weight.numel()
    text = spec["text"]
    return Shape(tensors, text["hidden_size"], text["intermediate_size"]), head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens of the batch in flight "
                        "(32 texts of 256 tokens; the GPU default cap is 32768)")
    args = parser.parse_args()
    rows = [("none", "float32"), ("none", "bfloat16"), ("int8", "bfloat16"), ("fp8", "bfloat16"), ("nf4", "bfloat16")]
    print(f"| pair | weights | dtype | weights held | + one batch of {args.batch_tokens} tokens | peak while loading | "
          + " | ".join(f"fits {c / 1e9:.0f} GB" for c in CARDS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(CARDS))
    for name in SHAPES:
        shape, head = shape_of(name)
        for fmt, dtype in rows:
            plans = [Plan("embedding", shape, fmt, dtype), Plan("reranker", shape, fmt, dtype)]
            parts = [estimate(p.kind, p.shape, p.fmt, p.dtype, args.batch_tokens) for p in plans]
            held = sum(e.weights_bytes for e in parts)
            working = max(e.working_bytes for e in parts)  # one batch at a time, of either model
            peak = held + head * 2  # the reranker's head, in the checkpoint's bf16, until it is dropped
            need = max(held + working, peak)
            fits = " | ".join("yes" if need <= card else "no" for card in CARDS)
            print(f"| {name} | {fmt} | {dtype} | {size(held)} | {size(held + working)} | {size(peak)} | {fits} |")


if __name__ == "__main__":
    main()
