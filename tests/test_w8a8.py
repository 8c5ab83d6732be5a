"""w8a8: int8 weights and per-token int8 activations, summed exactly, the same integers on every
kernel, a row's result its own, and refused where no int8 kernel exists (test_weights.py checks the
format through the models and the daemon like the others)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from conftest import needs_w8a8
from daemon.loading.w8a8 import (ACTIVATION_LEVELS, PACKED_ROW_BYTES, WEIGHT_LEVELS, W8A8Unavailable, check_device,
                         linear_class, matmul_cpu, matmul_int_mm, pack_cpu, quantize_tokens, quantize_weight)
from daemon.loading.weights import FormatError, check_format, release_freed_memory

def _layer(rows: int = 96, cols: int = 128, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():  # rows of very different magnitudes, as trained layers have
        layer.weight.mul_(torch.logspace(-2, 0, rows)[torch.randperm(rows)].unsqueeze(1))
    return layer


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@needs_w8a8
def test_a_layer_stays_within_its_bound_of_the_exact_one():
    layer = _layer()
    x = torch.randn(40, 128)
    with torch.no_grad():
        assert _error(linear_class()(layer, "cpu")(x), layer(x)) <= 0.04


@needs_w8a8
def test_the_check_catches_a_wrong_scale_or_layout():
    layer = _layer()
    x = torch.randn(40, 128)
    want = layer(x).detach()
    qweight, scale = quantize_weight(layer.weight.detach())
    q, token_scale = quantize_tokens(x)

    def error(qw, sc) -> float:
        return _error(matmul_cpu(q, pack_cpu(qw, sc)) * token_scale, want)

    assert error(qweight, scale) <= 0.04
    assert error(qweight, torch.roll(scale, 1)) > 0.5  # a scale on the wrong row
    assert error(torch.roll(qweight, 1, dims=0), scale) > 0.5  # rows out of place
    assert error(qweight.reshape(128, 96).t().contiguous(), scale) > 0.5  # a transposed layout


@needs_w8a8
def test_the_cpu_kernel_sums_the_same_integers_as_the_int_mm_path():
    # torch._int_mm is what runs on CUDA; on the CPU it is a reference: the same int8 values must give
    # the same int32 sums, so a vector does not depend on which kernel made it.
    qweight, scale = quantize_weight(_layer(64, 256).weight.detach())
    q, _ = quantize_tokens(torch.randn(24, 256) * torch.logspace(-3, 2, 24).unsqueeze(1))
    fbgemm = matmul_cpu(q, pack_cpu(qweight, scale))
    reference = matmul_int_mm(q, qweight.t(), scale)
    torch.testing.assert_close(fbgemm, reference, rtol=1e-6, atol=0)


@needs_w8a8
def test_the_largest_activations_and_weights_are_summed_without_saturating():
    # Pairs of u8 x s8 products that overflow int16 are where an 8-bit activation goes wrong on AVX2.
    qweight = torch.full((16, 512), WEIGHT_LEVELS, dtype=torch.int8)
    qweight[1::2] = -WEIGHT_LEVELS
    q = torch.full((4, 512), float(ACTIVATION_LEVELS))
    q[1::2] = -ACTIVATION_LEVELS
    got = matmul_cpu(q, pack_cpu(qweight, torch.ones(16)))
    want = q.double() @ qweight.double().t()
    assert torch.equal(got.double(), want), (got[0, :2], want[0, :2])
    assert float(want.abs().max()) == ACTIVATION_LEVELS * WEIGHT_LEVELS * 512


@needs_w8a8
def test_a_rows_result_is_the_same_alone_and_among_any_others():
    layer = linear_class()(_layer(), "cpu")
    torch.manual_seed(1)
    rows = torch.randn(12, 128) * torch.logspace(-2, 3, 12).unsqueeze(1)  # neighbours far larger and smaller
    with torch.no_grad():
        together = layer(rows)
        for i in range(len(rows)):
            assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1]), i
            assert torch.equal(layer(rows[[i, 0, 5]])[0], together[i])


@needs_w8a8
def test_padding_rows_of_zeros_give_zeros_and_keep_the_shape():
    layer = linear_class()(_layer(), "cpu")
    x = torch.zeros(2, 3, 128)
    x[0, 0] = torch.randn(128)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 3, 96) and torch.equal(out[1], torch.zeros(3, 96)) and out[0, 0].abs().sum() > 0


@needs_w8a8
def test_a_bfloat16_input_comes_back_in_bfloat16():
    layer = linear_class()(_layer(), "cpu")
    x = torch.randn(5, 128)
    with torch.no_grad():
        got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert _error(got.float(), layer(x)) < 0.01


@needs_w8a8
def test_what_a_layer_says_it_holds_is_what_packing_takes_from_memory():
    def resident() -> int:
        gc.collect()
        release_freed_memory()  # as loading does: freed temporaries leave the heap
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    weight = torch.nn.Linear(2048, 6144, bias=False)  # the 2B model's MLP shape
    before = resident()
    layers = [linear_class()(weight, "cpu") for _ in range(4)]
    grown = resident() - before
    said = sum(layer.packed_bytes for layer in layers)
    assert said == 4 * (6144 * 2048 + PACKED_ROW_BYTES * 6144)
    assert 0.9 * said <= grown <= 1.3 * said, (grown, said)  # measured: 1.13 bytes per weight


@needs_w8a8
def test_a_layer_computes_exactly_the_product_of_its_quantized_operands():
    # The bound above allows quantization's error; this allows only float rounding, so a scale a
    # few percent off, or applied to the wrong row or token, fails here.
    # The operands by the format's definition, written out here (not by the module's own functions):
    # each weight row by its absmax over 64, each token by its absmax over 127, rounded half to even.
    layer = _layer(64, 256)
    x = torch.randn(9, 256) * torch.logspace(-2, 2, 9).unsqueeze(1)
    w = layer.weight.detach()
    w_scale = w.abs().amax(dim=1, keepdim=True) / 64
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127
    want = (torch.round(x / x_scale).double() * x_scale.double()) @ \
        (torch.round(w / w_scale).double() * w_scale.double()).t()
    with torch.no_grad():
        got = linear_class()(layer, "cpu")(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))


@needs_w8a8
def test_a_row_with_an_infinite_or_nan_activation_is_nan_and_alone_in_that():
    layer = linear_class()(_layer(), "cpu")
    x = torch.randn(4, 128)
    x[1, 3], x[2, 7] = float("inf"), float("nan")
    with torch.no_grad():
        out, alone = layer(x), layer(x[[0, 3]])
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[[0, 3]], alone)


@needs_w8a8
def test_packing_in_several_threads_at_once_leaves_torchs_quantized_engine_as_it_was():
    before = torch.backends.quantized.engine
    weight = _layer().weight.detach()
    threads = [threading.Thread(target=lambda: [pack_cpu(*quantize_weight(weight)) for _ in range(50)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.backends.quantized.engine == before


@pytest.mark.parametrize("isa, machine", [("DEFAULT", "x86_64"), ("AVX2", "aarch64"), ("SVE256", "arm64")])
def test_a_cpu_without_an_int8_kernel_is_refused_naming_what_to_pass(monkeypatch, isa, machine):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.setattr("platform.machine", lambda: machine)
    with pytest.raises(W8A8Unavailable, match=f"this CPU is {machine} with torch's {isa} kernels: pass int8"):
        check_device(torch.device("cpu"))


def test_mps_is_refused_saying_what_w8a8_does_and_what_to_pass():
    with pytest.raises(FormatError, match=r"--quantize: w8a8 computes in int8 on x86 CPUs .* MPS has no int8 matrix "
                                          r"kernel in torch: pass int8 .* or none"):
        check_format("w8a8", torch.device("mps"))


@needs_w8a8
def test_this_cpu_and_cuda_are_accepted_without_torchao(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    check_format("w8a8", torch.device("cpu"))
    check_device(torch.device("cuda"))
