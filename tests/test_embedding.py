"""Embeddings through the live daemon equal the official algorithm's (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import gradient_png, pil
from reference import ReferenceEmbedder

ATOL = 2e-5


@pytest.fixture(scope="module")
def ref(tiny_dir) -> ReferenceEmbedder:
    return ReferenceEmbedder(str(tiny_dir))


def test_text_embeddings_match_the_official_algorithm(client, ref):
    texts = ["hello world", "The quick brown fox jumps over the lazy dog.", "ünïcødé ✓ 漢字", "  spaced  "]
    got = client.embed(texts).embeddings
    want = ref.embed([{"texts": [t]} for t in texts])
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_image_embedding_matches_the_official_algorithm(client, ref):
    data = gradient_png(1)
    got = client.embed([{"image": data}, {"image": data, "text": "a caption"}]).embeddings
    want = ref.embed([{"images": [pil(data)]}, {"images": [pil(data)], "texts": ["a caption"]}])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_video_frames_embedding_matches_the_official_algorithm(client, ref):
    frames = [gradient_png(i) for i in range(6)]
    got = client.embed([{"video": frames}]).embeddings
    want = ref.embed([{"videos": [[pil(f) for f in frames]]}])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_more_than_64_frames_are_sampled_like_the_official_code(client, ref):
    frames = [gradient_png(i % 7, size=(32, 32)) for i in range(70)]
    got = client.embed([{"video": frames}]).embeddings
    want = ref.embed([{"videos": [[pil(f) for f in frames]]}])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_video_file_embedding_matches_the_official_algorithm(client, ref, media_dir):
    path = str(media_dir / "clip.mp4")
    got = client.embed([{"video": {"path": path}}, {"video": {"path": path}, "fps": 4.0, "max_frames": 8}]).embeddings
    want = np.concatenate([ref.embed([{"videos": [path]}]), ref.embed([{"videos": [path], "fps": 4.0, "max_frames": 8}])])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not np.allclose(got[0], got[1], atol=1e-4), "fps/max_frames must change what the model sees"


def test_mixed_input_orders_videos_then_images_then_texts(client, ref):
    frames, image = [gradient_png(3), gradient_png(4)], gradient_png(5)
    got = client.embed([{"text": ["first", "second"], "image": image, "video": frames}]).embeddings
    want = ref.embed([{"texts": ["first", "second"], "images": [pil(image)], "videos": [[pil(f) for f in frames]]}])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_empty_input_is_embedded_as_null(client, ref):
    got = client.embed([{}]).embeddings
    np.testing.assert_allclose(got, ref.embed([{"texts": ["NULL"]}]), atol=ATOL)


def test_instruction_is_stripped_and_gets_a_period(client, ref):
    bare = client.embed(["query text"], instruction="  Find the answer  ").embeddings
    dotted = client.embed(["query text"], instruction="Find the answer.").embeddings
    default = client.embed(["query text"]).embeddings
    np.testing.assert_allclose(bare, dotted, atol=1e-6)
    np.testing.assert_allclose(bare, ref.embed([{"texts": ["query text"], "instruction": "Find the answer"}]), atol=ATOL)
    assert not np.allclose(bare, default, atol=1e-4)


def test_instruction_ending_in_unicode_punctuation_is_kept(client, ref):
    got = client.embed(["x"], instruction="Trouve la réponse ?").embeddings
    np.testing.assert_allclose(got, ref.embed([{"texts": ["x"], "instruction": "Trouve la réponse ?"}]), atol=ATOL)
    assert not np.allclose(got, client.embed(["x"], instruction="Trouve la réponse ?.").embeddings, atol=1e-4)


def test_per_input_instruction_wins_over_the_request_instruction(client):
    own = client.embed([{"text": "x", "instruction": "Mine"}], instruction="Theirs").embeddings
    np.testing.assert_allclose(own, client.embed(["x"], instruction="Mine").embeddings, atol=1e-6)


def test_dimension_keeps_the_first_components_and_renormalizes(client, ref):
    full = ref.embed([{"texts": ["matryoshka"]}], normalize=False)[0]
    got = client.embed(["matryoshka"], dimension=16)
    assert got.embeddings.shape == (1, 16) and got.dimension == 16
    np.testing.assert_allclose(got.embeddings[0], full[:16] / np.linalg.norm(full[:16]), atol=ATOL)


def test_normalize_false_returns_the_raw_pooled_vector(client, ref):
    got = client.embed(["raw"], normalize=False, dimension=8).embeddings[0]
    np.testing.assert_allclose(got, ref.embed([{"texts": ["raw"]}], normalize=False)[0][:8], atol=ATOL)
    assert abs(np.linalg.norm(got) - 1.0) > 1e-3


def test_list_encoding_equals_float32_encoding(client):
    binary = client.request({"op": "embed", "inputs": ["a", "b"]})
    listed = client.request({"op": "embed", "inputs": ["a", "b"], "encoding": "list"})
    assert isinstance(binary["embeddings"], bytes) and len(binary["embeddings"]) == 2 * 64 * 4
    np.testing.assert_array_equal(np.frombuffer(binary["embeddings"], "<f4").reshape(2, 64),
                                  np.asarray(listed["embeddings"], dtype=np.float32))
    assert binary["count"] == 2 and binary["dimension"] == 64 and binary["tokens"] > 0


def test_a_batch_gives_the_same_vectors_as_one_by_one(client):
    inputs = ["short", "a much longer input " * 20, {"image": gradient_png(9)}, {"video": [gradient_png(1)] * 3},
              "médium length text with ünïcode", {}] * 3  # 18 inputs: several forwards of up to 8
    together = client.embed(inputs).embeddings
    alone = np.concatenate([client.embed([item]).embeddings for item in inputs])
    np.testing.assert_allclose(together, alone, atol=ATOL)
