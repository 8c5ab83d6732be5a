"""The test oracle: the official Qwen3-VL-Embedding / Qwen3-VL-Reranker algorithms, written the way
the official code runs them (one processor call over the whole batch, file:// media, a Linear score
head, one forward per rerank pair), independently of the daemon's own code path."""

from __future__ import annotations

import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

PIXELS = 32 * 32
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')


def _content(texts=(), images=(), videos=(), fps=None, max_frames=None):
    """Official content order: videos, images, texts; NULL when empty. Media are PIL images
    (frames: lists of PIL images) or file paths."""
    if not texts and not images and not videos:
        return [{"type": "text", "text": "NULL"}]
    content = []
    for video in videos:
        if isinstance(video, list):
            frames = video if len(video) <= 64 else [video[i] for i in np.linspace(0, len(video) - 1, 64, dtype=int)]
            content.append({"type": "video", "video": frames, "total_pixels": 10 * 768 * PIXELS})
        else:
            content.append({"type": "video", "video": "file://" + video, "fps": fps or 1, "max_frames": max_frames or 64})
    for image in images:
        content.append({"type": "image", "image": image, "min_pixels": 4 * PIXELS, "max_pixels": 1800 * PIXELS})
    content += [{"type": "text", "text": t} for t in texts]
    return content


def _vision(conversations):
    images, videos, kwargs = process_vision_info(conversations, image_patch_size=16, return_video_kwargs=True,
                                                 return_video_metadata=True)
    metadata = None
    if videos is not None:
        videos, metadata = (list(x) for x in zip(*videos))
    return images, videos, metadata, kwargs


class ReferenceEmbedder:
    def __init__(self, path: str):
        self.processor = AutoProcessor.from_pretrained(path, padding_side="right")
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).model.eval()

    def conversation(self, texts=(), images=(), videos=(), instruction=None, fps=None, max_frames=None):
        if instruction:
            instruction = instruction.strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction = instruction + "."
        return [{"role": "system", "content": [{"type": "text", "text": instruction or "Represent the user's input."}]},
                {"role": "user", "content": _content(list(texts), list(images), list(videos), fps, max_frames)}]

    @torch.no_grad()
    def embed(self, items: list[dict], normalize: bool = True) -> np.ndarray:
        conversations = [self.conversation(**item) for item in items]
        text = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        images, videos, metadata, kwargs = _vision(conversations)
        inputs = self.processor(text=text, images=images, videos=videos, video_metadata=metadata, padding=True,
                                do_resize=False, return_tensors="pt", **kwargs)
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        col = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1
        out = hidden[torch.arange(hidden.shape[0]), col]
        return (F.normalize(out, p=2, dim=-1) if normalize else out).numpy()


class ReferenceReranker:
    def __init__(self, path: str):
        self.processor = AutoProcessor.from_pretrained(path, padding_side="left")
        lm = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.model = lm.model
        vocab = self.processor.tokenizer.get_vocab()
        self.head = torch.nn.Linear(lm.config.text_config.hidden_size, 1, bias=False)
        with torch.no_grad():
            self.head.weight[0] = lm.lm_head.weight[vocab["yes"]] - lm.lm_head.weight[vocab["no"]]

    def pair(self, query: dict, document: dict, instruction=None):
        content = [{"type": "text", "text": "<Instruct>: " + (instruction or
                    "Given a search query, retrieve relevant candidates that answer the query.")},
                   {"type": "text", "text": "<Query>:"}, *_content(**query),
                   {"type": "text", "text": "\n<Document>:"}, *_content(**document)]
        return [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": content}]

    @torch.no_grad()
    def score_one(self, conversation, max_length: int = 10240) -> float:
        text = self.processor.apply_chat_template([conversation], tokenize=False, add_generation_prompt=True)
        images, videos, metadata, kwargs = _vision([conversation])
        inputs = self.processor(text=text, images=images, videos=videos, video_metadata=metadata,
                                truncation=False, padding=False, do_resize=False, **kwargs)
        special = set(self.processor.tokenizer.all_special_ids)
        ids = inputs["input_ids"][0]
        head, tail = ids[:-5], ids[-5:]
        if len(head) > max_length:
            budget = max_length - sum(t in special for t in head)
            kept = []
            for t in head:
                if t in special or budget > 0:
                    budget -= t not in special
                    kept.append(t)
            head = kept
        padded = self.processor.tokenizer.pad({"input_ids": [head + tail]}, padding=True, return_tensors="pt")
        tensors = {k: torch.as_tensor(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        tensors["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(padded["input_ids"].tolist()))
        tensors.update(padded)
        hidden = self.model(**tensors).last_hidden_state[:, -1]
        return float(torch.sigmoid(self.head(hidden)).squeeze())

    def scores(self, query: dict, documents: list[dict], instruction=None, max_length: int = 10240) -> list[float]:
        return [self.score_one(self.pair(query, d, instruction), max_length) for d in documents]
