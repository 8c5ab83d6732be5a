"""Weight formats: what `--quantize` converts and keeps, each quantized layer against its exact one,
the estimate from the files' headers against what loading holds, and identity across formats."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import W8A8_REFUSAL, Bridge, gradient_png, needs_w8a8, start_daemon
from daemon.engine.backends import _check_calibration_print
from daemon.config import MediaPolicy, ModelSettings
from daemon.errors import ModelLoadError
from daemon.loading.fingerprint import weights_fingerprint
from daemon.loading.fit import checkpoint_shape, weights_bytes
from daemon.inputs.media_reader import MediaReader
from qwen3vl_client.inputs import InputItem, MediaSource
from daemon.models import EmbeddingModel, RerankerModel
from daemon.loading.w8a8 import linear_class
from daemon.loading.weights import FormatError, check_format, is_quantized_layer, is_quantized_tensor, model_bytes, to_nf4

FORMATS = ("int8", "nf4", "w8a8")
# Relative error (Frobenius norm of the difference over the exact output's) that a quantized layer
# may make on the model's own activations. Measured on the tiny model's random weights: int8 at most
# 0.006, nf4 at most 0.11 (NF4's levels are ~0.1 apart at the block's scale), w8a8 at most 0.018 (its
# weights within +-64 and its activations' per-token steps); a wrong scale, layout or nibble order
# makes each exceed 0.5 (the checks below and test_w8a8.py).
LAYER_BOUND = {"int8": 0.02, "nf4": 0.2, "w8a8": 0.04}
FORMAT_PARAMS = [pytest.param(f, marks=needs_w8a8) if f == "w8a8" else f for f in FORMATS]


def _model(cls, tiny_dir, quantize: str):
    return cls(ModelSettings(str(tiny_dir), dtype="float32", quantize=quantize), MediaReader(MediaPolicy()))


@pytest.fixture(scope="module")
def exact(tiny_dir):
    return _model(EmbeddingModel, tiny_dir, "none")


@pytest.fixture(scope="module", params=FORMAT_PARAMS)
def quantized(request, tiny_dir):
    return request.param, _model(EmbeddingModel, tiny_dir, request.param)


def _mixed(model) -> list:
    items = [InputItem("inputs[0]", texts=("a short text",)),
             InputItem("inputs[1]", texts=("a longer text about weights and their formats " * 6,)),
             InputItem("inputs[2]", images=(MediaSource("bytes", gradient_png(3), "inputs[2].image[0]"),))]
    return [model.prepare(item) for item in items]


def test_a_format_converts_the_language_models_linear_layers_and_keeps_the_rest_in_the_dtype(quantized):
    fmt, model = quantized
    converted = kept = 0
    for name, module in model.full_model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".language_model.layers." in f".{name}":
            assert is_quantized_tensor(module.weight), name
            converted += 1
        else:  # the vision tower and its mergers
            assert not is_quantized_tensor(module.weight) and module.weight.dtype == torch.float32, name
            kept += 1
    if fmt == "w8a8":  # the layers themselves are replaced
        converted = sum(isinstance(m, linear_class()) for m in model.full_model.modules())
    assert converted == 7 * model.config.text_config.num_hidden_layers and kept > 0
    table = model.model.get_input_embeddings()
    assert table.rows.dtype == torch.int8 and table.scales.dtype == torch.float32


def test_the_int8_embedding_table_looks_up_each_row_within_its_bound(exact, quantized):
    fmt, model = quantized
    ids = torch.arange(exact.config.text_config.vocab_size)
    with torch.no_grad():
        want = exact.model.get_input_embeddings()(ids)
        got = model.model.get_input_embeddings()(ids)
    error = (got - want).norm(dim=1) / want.norm(dim=1)
    assert got.dtype == want.dtype and float(error.max()) <= LAYER_BOUND["int8"], float(error.max())


def test_the_reranker_score_vector_stays_in_the_compute_dtype(tiny_dir):
    exact, reranker = _model(RerankerModel, tiny_dir, "none"), _model(RerankerModel, tiny_dir, "int8")
    assert not is_quantized_tensor(reranker.score_vector) and reranker.score_vector.dtype == torch.float32
    torch.testing.assert_close(reranker.score_vector, exact.score_vector, rtol=0, atol=0)


def _layer_inputs(model, features) -> dict[str, torch.Tensor]:
    """Each language-model linear layer's input during a forward of `features`."""
    seen: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(module, args, output) -> None:  # returns None: the output stays as it is
            seen[name] = args[0].detach()
        return keep

    hooks = [module.register_forward_hook(keeper(name))
             for name, module in model.full_model.named_modules() if is_quantized_layer(name, module)]
    try:
        model.embed(features)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_each_quantized_layer_matches_its_exact_layer_on_the_models_own_activations(exact, quantized):
    fmt, model = quantized
    inputs = _layer_inputs(exact, _mixed(exact))
    layers, exact_layers = dict(model.full_model.named_modules()), dict(exact.full_model.named_modules())
    errors = {}
    with torch.inference_mode():
        for name, x in inputs.items():
            want = exact_layers[name](x)
            got = layers[name](x)
            errors[name] = float((got - want).norm() / want.norm())
    assert len(errors) == 7 * model.config.text_config.num_hidden_layers
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LAYER_BOUND[fmt], (worst, errors[worst])


def test_the_layer_check_catches_a_wrong_scale_or_nibble_order():
    torch.manual_seed(0)
    # Rows of very different magnitudes, as trained layers have: a scale applied to the wrong block shows.
    weight = torch.randn(128, 64) * torch.logspace(-3, -1, 128)[torch.randperm(128)].unsqueeze(1)
    x = torch.randn(16, 64)
    want = x @ weight.T

    def error(w) -> float:
        return float((torch.nn.functional.linear(x, w) - want).norm() / want.norm())

    good = to_nf4(weight)
    assert error(good) <= LAYER_BOUND["nf4"]
    swapped = to_nf4(weight)
    swapped.quantized_data = (swapped.quantized_data << 4) | (swapped.quantized_data >> 4)
    rolled = to_nf4(weight)
    rolled.quantized_scalers = torch.roll(rolled.quantized_scalers, 1)
    assert error(swapped) > 0.5 and error(rolled) > 0.5


def test_vectors_of_a_format_stay_close_to_the_exact_models(exact, quantized):
    fmt, model = quantized
    features = _mixed(exact)
    want, got = exact.embed(features).numpy(), model.embed(_mixed(model)).numpy()
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= {"int8": 0.999, "nf4": 0.95, "w8a8": 0.999}[fmt], cosine


@pytest.mark.parametrize("fmt", ["none", *FORMAT_PARAMS])
def test_the_estimate_from_the_headers_is_what_the_loaded_model_holds(tiny_dir, fmt):
    model = _model(EmbeddingModel, tiny_dir, fmt)
    estimate, held = weights_bytes(checkpoint_shape(tiny_dir), fmt, "float32"), model_bytes(model.full_model)
    assert abs(estimate - held) <= 0.01 * held, (estimate, held)


def test_a_quantized_model_holds_less_than_the_exact_one(tiny_dir, exact):
    here = [f for f in FORMATS if f != "w8a8" or W8A8_REFUSAL is None]
    sizes = {fmt: model_bytes(_model(EmbeddingModel, tiny_dir, fmt).full_model) for fmt in here}
    assert sizes["nf4"] < sizes["int8"] < sizes.get("w8a8", sizes["int8"] + 1) < model_bytes(exact.full_model)


def test_the_fingerprint_is_the_files_unquantized_and_one_per_format_otherwise():
    files = "0123456789abcdef0123"
    assert weights_fingerprint(files, "none") == files
    each = {fmt: weights_fingerprint(files, fmt) for fmt in ("int8", "nf4", "fp8", "w8a8")}
    assert len(set(each.values())) == 4 and files not in each.values()
    assert each == {fmt: weights_fingerprint(files, fmt) for fmt in ("int8", "nf4", "fp8", "w8a8")}  # stable
    assert weights_fingerprint("fedcba9876543210fedc", "int8") != each["int8"]


def test_the_fingerprint_of_each_format_is_the_formula_protocol_md_states():
    doc = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    recipes = dict(re.findall(r"^\| `(int8|nf4|fp8|w8a8)` \| `([^`]+)` \|$", doc, re.MULTILINE))
    assert set(recipes) == {"int8", "nf4", "fp8", "w8a8"}
    files = "0123456789abcdef0123"
    for fmt, recipe in recipes.items():
        assert weights_fingerprint(files, fmt) == hashlib.sha256(f"{files}\tweights\t{recipe}\n".encode()).hexdigest()[:20]


def test_a_calibration_made_under_another_format_is_refused_before_loading_naming_that_format():
    files = "0123456789abcdef0123"
    settings = ModelSettings("/models/embedding", quantize="none")
    calibration = SimpleNamespace(fingerprint=weights_fingerprint(files, "int8"))
    with pytest.raises(ModelLoadError, match="made with these same files in weight format int8, and the embedding "
                                             "model now runs in none; run it in int8 \\(--embedding-quantize int8\\)"):
        _check_calibration_print(calibration, settings, files, weights_fingerprint(files, "none"))
    _check_calibration_print(calibration, replace(settings, quantize="int8"), files, weights_fingerprint(files, "int8"))
    with pytest.raises(ModelLoadError, match="calibrate` again"):
        _check_calibration_print(SimpleNamespace(fingerprint="f" * 20), settings, files, files)


def test_fp8_on_a_cpu_is_refused_naming_int8():
    with pytest.raises(FormatError, match=r"compute capability 8\.9.*pass int8 instead"):
        check_format("fp8", torch.device("cpu"))


def test_a_format_without_torchao_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(FormatError, match=r"needs torchao.*qwen3vl-daemon\[quant\].*or pass none"):
        check_format("int8", torch.device("cpu"))
    check_format("none", torch.device("cpu"))  # the unquantized path needs no torchao


# -- through the daemon ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_daemon(tmp_path_factory, tiny_dir):
    proc = start_daemon(tmp_path_factory.mktemp("plain"), "--embedding-model", str(tiny_dir),
                        "--reranker-model", str(tiny_dir))
    yield proc
    proc.stop()


@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
def test_a_quantized_daemon_serves_under_its_own_fingerprint_and_says_its_weights(tmp_path, tiny_dir, plain_daemon,
                                                                                  fmt):
    with plain_daemon.client() as c:
        plain = c.health()
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir),
                        "--quantize", fmt)
    try:
        with proc.client() as c:
            health = c.health()
            for kind in ("embedding", "reranker"):
                model = health[kind]
                assert model["weights"] == fmt and plain[kind]["weights"] == "float32"
                assert 0 < model["memory_bytes"] < plain[kind]["memory_bytes"]
                assert abs(model["memory_estimate_bytes"] - model["memory_bytes"]) <= 0.01 * model["memory_bytes"]
                assert model["fingerprint"] != plain[kind]["fingerprint"]
            assert health["load"]["memory_bytes"] == health["embedding"]["memory_bytes"] + \
                health["reranker"]["memory_bytes"]
            reply = c.embed(["text", {"image": gradient_png(1)}])
            assert reply.fingerprint == health["embedding"]["fingerprint"]
            with pytest.raises(Exception, match="model_mismatch|fingerprint"):
                c.embed(["text"], expect_fingerprint=plain["embedding"]["fingerprint"])
            scores = c.rerank("q", ["a", "b"]).scores
            assert all(0 <= s <= 1 for s in scores)
        with plain_daemon.client() as c:
            with pytest.raises(Exception, match="model_mismatch|fingerprint"):
                c.embed(["text"], expect_fingerprint=health["embedding"]["fingerprint"])
        with Bridge(proc.endpoint) as bridge, bridge.http() as http:
            assert http.get("/health").json()["embedding_weights"] == fmt
            embedded = http.post("/embed", json={"texts": ["text"]})
            assert embedded.status_code == 200, embedded.text
            np.testing.assert_allclose(embedded.json()["embeddings"][0], reply.embeddings[0], atol=1e-6)
            ranked = http.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
            assert ranked.status_code == 200, ranked.text
    finally:
        proc.stop()


@pytest.mark.parametrize("flags, says", [
    (("--quantize", "int4"), "the embedding model's weights (--embedding-quantize, else --quantize): unknown "
                             "format 'int4'; use none, int8, nf4, fp8 or w8a8"),
    (("--reranker-quantize", "fp8"), "the reranker model's weights (--reranker-quantize, else --quantize): fp8 needs "
                                     "a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this is device cpu: "
                                     "pass int8 instead"),
    (("--embedding-quantize", "bogus"), "(--embedding-quantize, else --quantize): unknown format 'bogus'"),
])
def test_a_format_that_cannot_work_stops_the_start_in_one_line(tmp_path, tiny_dir, flags, says):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir), *flags,
                        wait=False)
    assert proc.process.wait(60) == 1
    lines = [line for line in proc.log.read_text().splitlines() if line.startswith("qwen3vl-daemon:")]
    assert len(lines) == 1 and says in lines[0], lines


def test_per_model_overrides_win_over_quantize(tmp_path, tiny_dir):
    proc = start_daemon(tmp_path, "--embedding-model", str(tiny_dir), "--reranker-model", str(tiny_dir),
                        "--quantize", "int8", "--reranker-quantize", "none", "--embedding-quantize", "nf4")
    try:
        with proc.client() as c:
            health = c.health()
        assert (health["embedding"]["weights"], health["reranker"]["weights"]) == ("nf4", "float32")
    finally:
        proc.stop()


def test_the_same_files_in_the_same_format_keep_their_fingerprint_across_restarts(tmp_path, tiny_dir):
    prints = []
    for run in range(2):
        proc = start_daemon(tmp_path / str(run), "--embedding-model", str(tiny_dir), "--reranker-model", "none",
                            "--quantize", "int8")
        with proc.client() as c:
            prints.append(c.health()["embedding"]["fingerprint"])
        proc.stop()
    assert prints[0] == prints[1]
