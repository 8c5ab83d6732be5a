"""The frameworks people point at the bridge's OpenAI route, run as their users run them: LangChain's
OpenAIEmbeddings and LlamaIndex's OpenAI-compatible embedding class, each in its own process (their
imports patch asyncio), against a real bridge and daemon."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np

CLIENTS = """
import json, sys
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai_like import OpenAILikeEmbedding

url, model = sys.argv[1], sys.argv[2]
texts = ["a red apple", "a blue sky"]
langchain = OpenAIEmbeddings(base_url=url + "/v1", api_key="unused", model=model, check_embedding_ctx_length=False)
llama = OpenAILikeEmbedding(model_name=model, api_base=url + "/v1", api_key="unused")
print(json.dumps({"langchain": langchain.embed_documents(texts), "langchain_query": langchain.embed_query(texts[0]),
                  "llamaindex": llama.get_text_embedding_batch(texts),
                  "llamaindex_query": llama.get_query_embedding(texts[0])}))
"""


def served_model(client) -> str:
    return next(m["name"] for m in client.health()["models"] if m["task"] == "embedding")


def test_langchain_and_llamaindex_get_the_daemons_own_vectors(bridge, client):
    model = served_model(client)
    done = subprocess.run([sys.executable, "-c", CLIENTS, bridge.url, model], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    own = client.embed(["a red apple", "a blue sky"]).embeddings
    for name in ("langchain", "llamaindex"):
        np.testing.assert_allclose(np.array(got[name]), own, atol=1e-5)
        np.testing.assert_allclose(np.array(got[f"{name}_query"]), own[0], atol=1e-5)


def test_token_ids_as_langchain_sends_them_by_default_are_refused_naming_the_setting(bridge, client):
    model = served_model(client)
    # LangChain's OpenAIEmbeddings without check_embedding_ctx_length=False: tiktoken's ids, base64 asked.
    for ids in ([[64, 2579, 24149], [64, 6437, 13180]], [64, 2579, 24149], 64):
        response = httpx.post(f"{bridge.url}/v1/embeddings", timeout=30,
                              json={"model": model, "input": ids, "encoding_format": "base64"})
        assert response.status_code == 422, response.text
        assert "check_embedding_ctx_length=False" in response.text and "tiktoken" in response.text


def test_the_openai_route_takes_an_instruction_as_an_extension(bridge, client):
    body = {"input": ["a red apple"], "instruction": "Represent the fruit."}
    got = httpx.post(f"{bridge.url}/v1/embeddings", json=body, timeout=30).json()["data"][0]["embedding"]
    own = client.embed(["a red apple"], instruction="Represent the fruit.").embeddings[0]
    np.testing.assert_allclose(np.array(got), own, atol=1e-5)
