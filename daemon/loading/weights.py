"""How a model holds its weights: in its compute dtype, or with the language model's linear layers
quantized (int8, nf4, fp8) through torchao, or computed in int8 (w8a8, w8a8.py).

The language model's decoder linear layers (q/k/v/o and the MLP's gate/up/down: 1.41 of the 2B
model's 2.13 billion weights) take the format; its token embedding table (0.31 billion) takes int8
rows in every format (a lookup: no kernel to gain, half the bytes in bfloat16). The vision tower,
the norms and the reranker's yes-minus-no score vector (taken from the unquantized LM head) stay in
the compute dtype: the research on these models advises keeping the vision tower exact, and
BENCHMARKS.md measures what quantizing it would cost and save.

Layers are converted one at a time from the loaded checkpoint (on the CPU, in the file's dtype) and
only then moved to the device, so the device never holds the whole model at full precision; the
converted model is then kept in the weights cache (weights_cache.py), so a restart skips all this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

NONE, INT8, NF4, FP8, W8A8 = "none", "int8", "nf4", "fp8", "w8a8"
FORMATS = (NONE, INT8, NF4, FP8, W8A8)
QUANTIZED = (INT8, NF4, FP8, W8A8)
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first with float8 tensor cores (torch._scaled_mm)
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's block)
NF4_SCALER_BLOCK = 256  # scales per second-level scale (double quantization)
INSTALL_HINT = "pip install 'qwen3vl-daemon[quant]' (torchao)"


class FormatError(Exception):
    """A weight format that cannot be used here; the message is one line naming what to pass."""


def parse_format(spec: str | None, what: str = "--quantize") -> str:
    """The format `spec` names; `what` names the setting in the message."""
    value = (spec or NONE).strip().lower()
    if value not in FORMATS:
        raise FormatError(f"{what}: unknown format {str(spec)[:40]!r}; use none, int8, nf4, fp8 or w8a8")
    return value


def check_format(fmt: str, device, what: str = "--quantize") -> None:
    """Refuse, before any weight is read, a format this device or environment cannot run."""
    if fmt == NONE:
        return
    if fmt == W8A8:  # its own kernels (w8a8.py): no torchao
        from daemon.loading.w8a8 import W8A8Unavailable, check_device

        try:
            check_device(device)
        except W8A8Unavailable as exc:
            raise FormatError(f"{what}: {exc}") from None
        return
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise FormatError(f"{what}: {fmt} needs torchao, which is not installed: {INSTALL_HINT}, "
                          "or pass none") from None
    if fmt == FP8:
        capability = _cuda_capability(device)
        if capability is None or capability < FP8_MIN_CAPABILITY:
            found = f"compute capability {capability[0]}.{capability[1]}" if capability else f"device {device}"
            raise FormatError(f"{what}: fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                              f"this is {found}: pass int8 instead")


# What each format's name stands for, in the fingerprint: bump a recipe when what the format
# computes changes (its layers, its table, its rounding), so that old vectors cannot pass for new.
RECIPES = {INT8: "int8/1: torchao int8 per-row linear layers, int8-row token table",
           NF4: "nf4/1: nf4 64-blocks nearest in float32, double-quantized scales; int8-row token table",
           FP8: "fp8/1: torchao float8 e4m3 per-row weights and per-token activations; int8-row token table",
           W8A8: "w8a8/1: int8 per-row weights within +-64, int8 per-token activations, int32 sums; int8-row token "
                 "table"}


def _cuda_capability(device) -> tuple[int, int] | None:
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


@dataclass(frozen=True)
class Converted:
    layers: int  # linear layers now in the format
    weights: int  # weights they hold


LANGUAGE_LAYER = re.compile(r"(^|\.)language_model\.layers\.\d+\.")
VISION_BLOCK = re.compile(r"(^|\.)visual\.blocks\.\d+\.")


def is_quantized_layer(name: str, module, include_vision: bool = False) -> bool:
    """Whether the linear layer `name` of a Qwen3-VL model is one a format converts: the language
    model's decoder layers (and, for measuring only, the vision tower's blocks)."""
    import torch

    if not isinstance(module, torch.nn.Linear):
        return False
    return bool(LANGUAGE_LAYER.search(name) or (include_vision and VISION_BLOCK.search(name)))


def convert(model, fmt: str, device, dtype) -> Converted:
    """Put every parameter of `model` (a loaded Qwen3-VL model, on the CPU) on `device` in `dtype`,
    with its language model's linear layers in `fmt` (one of QUANTIZED), one layer at a time, and
    its token table in int8 rows. The layers are converted on the device (each layer's
    full-precision copy there is transient)."""
    import torch

    layers = weights = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if is_quantized_layer(name, module):
                weights += module.weight.numel()
                layers += 1
                if fmt == W8A8:
                    from daemon.loading.w8a8 import linear_class

                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, linear_class()(module, device))
                    continue
                module.weight = torch.nn.Parameter(module.weight.detach().to(device=device, dtype=dtype),
                                                   requires_grad=False)
                _quantize(module, fmt)
        _int8_table(model, device, dtype)
        quantized = {id(p) for p in model.parameters() if is_quantized_tensor(p)}
        for param in model.parameters():
            if id(param) not in quantized:
                param.data = param.data.to(device=device, dtype=dtype if param.is_floating_point() else None)
        for module in model.modules():  # buffers (the rotary frequencies) keep their dtype, as from_pretrained's do
            for key, buffer in module.named_buffers(recurse=False):
                module._buffers[key] = buffer.to(device)
    release_freed_memory()
    return Converted(layers, weights)


EMBED_TOKENS = re.compile(r"(^|\.)language_model\.embed_tokens$")


def _int8_table(model, device, dtype) -> None:
    """Replace the language model's token embedding table by its int8 form (a scale per row): a
    lookup reads a row, so the table gains nothing from a matmul kernel, but it holds 311 million of
    the 2B model's weights, and int8 rows halve them in bfloat16 at a relative error of ~0.4%."""
    for name, module in list(model.named_modules()):
        if EMBED_TOKENS.search(name):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, int8_embedding_class()(module.weight.detach(), device, dtype))


@functools.cache
def int8_embedding_class():
    import torch

    class Int8Embedding(torch.nn.Module):
        """nn.Embedding's lookup over int8 rows, each with its own scale (symmetric absmax)."""

        def __init__(self, weight, device, dtype):
            super().__init__()
            weight = weight.to(device=device, dtype=torch.float32)
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            self._hold(torch.round(weight / scale).to(torch.int8), scale.to(dtype))

        @classmethod
        def from_rows(cls, rows, scales):
            """The table of int8 `rows` and their `scales` (its buffers, as the weights cache keeps them)."""
            table = cls.__new__(cls)
            torch.nn.Module.__init__(table)
            table._hold(rows, scales)
            return table

        def _hold(self, rows, scales) -> None:
            self.register_buffer("rows", rows)
            self.register_buffer("scales", scales)
            self.num_embeddings, self.embedding_dim = rows.shape

        def forward(self, ids):
            return self.rows[ids].to(self.scales.dtype) * self.scales[ids]

    return Int8Embedding


def _quantize(layer, fmt: str) -> None:
    """Replace the weight of `layer` (on its device, in the compute dtype) by its `fmt` form: int8
    per output row (symmetric absmax), nf4 per block of 64 with double-quantized scales (QLoRA),
    fp8 e4m3 per row with activations quantized per token at run time (torch._scaled_mm). w8a8
    replaces the layer itself (`convert` does that)."""
    import torch

    if fmt == NF4:
        layer.weight = torch.nn.Parameter(to_nf4(layer.weight.data), requires_grad=False)
        return
    from torchao.quantization import quantize_

    quantize_(layer, _torchao_config(fmt), filter_fn=lambda module, _name: module is layer)


def _torchao_config(fmt: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    if fmt == INT8:
        # set_inductor_config: off, so that quantizing leaves torch's global compiler settings alone.
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def to_nf4(weight):
    """torchao's NF4Tensor of `weight`, as its `to_nf4` makes it but with each weight's nearest
    level counted from the 15 midpoints between levels, in float32, rather than found from 16
    distances per weight in the weight's dtype: ~4x faster (0.14 s instead of 0.6 s for a 2048x6144
    layer here: 15 vectorised comparisons), and the truly nearest level where bfloat16 distances
    tie or round (a weight on a midpoint goes to the lower level, as torchao's argmin sends it)."""
    import torch
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs, \
        get_block_absmax

    numel = weight.numel()
    blocks, scaler_block = numel // NF4_BLOCK, _scaler_block(numel)
    scalers, factor, mean = NF4Tensor.double_quantize_scalers(weight.flatten(), NF4_BLOCK, scaler_block)
    levels = torch.tensor(NF4_LEVELS, device=weight.device, dtype=weight.dtype)  # as dequantizing reads them
    exact = levels.float()
    absmax = get_block_absmax(weight.flatten(), NF4_BLOCK).float()
    scaled = weight.reshape(blocks, NF4_BLOCK).float() / absmax.unsqueeze(-1)  # float32: the true nearest
    codes = torch.zeros(numel, dtype=torch.uint8, device=weight.device)
    for midpoint in ((exact[1:] + exact[:-1]) / 2).tolist():  # the code: how many midpoints lie below
        codes += scaled.flatten() > midpoint
    packed = codes[::2] << 4 | codes[1::2]  # two weights a byte, the first in the high half
    meta = SubclassTensorArgs(weight.size(), weight.stride(), weight.storage_offset(), weight.dtype, weight.device,
                              False)
    return NF4Tensor(meta, NF4_BLOCK, blocks, scaler_block, scalers, factor, mean, packed, nf4=levels)


# QLoRA's 16 levels: quantiles of a standard normal, scaled to [-1, 1] (as torchao lists them).
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
              0.4407, 0.5626, 0.7230, 1.0)


def _scaler_block(numel: int) -> int:
    """The second-level block: QLoRA's 256 scales where the layer's block count allows, else the
    largest power of two that divides it (small test models)."""
    blocks = numel // NF4_BLOCK
    size = NF4_SCALER_BLOCK
    while size > 1 and blocks % size:
        size //= 2
    return size


def is_quantized_tensor(tensor) -> bool:
    """A torchao tensor subclass (its storage is its inner tensors)."""
    import torch

    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__")


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds, counting a quantized tensor's inner tensors (data and scales)."""
    import torch

    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if is_quantized_tensor(data):
        names, _ = data.__tensor_flatten__()
        return sum(tensor_bytes(getattr(data, name)) for name in names)
    return data.nbytes if data.device.type != "meta" else 0


def model_bytes(model) -> int:
    """Bytes `model`'s parameters and buffers hold, each storage counted once (tied weights)."""
    seen: set[tuple] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:  # each parameter once (a tied one too)
        data = tensor.data
        # A quantized tensor by its parameter's identity (kept alive by the model; `.data` is a new
        # object on each access), a plain one by its memory (two views of one storage count once).
        key = ("q", id(tensor)) if is_quantized_tensor(data) else (data.device.type, data.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(data)
    # w8a8's CPU layers hold their weights in fbgemm's packed objects, which are not tensors.
    return total + sum(getattr(module, "packed_bytes", 0) for module in model.modules())


def weights_label(fmt: str, dtype) -> str:
    """What `health` calls a model's weights: its format, or its dtype when unquantized."""
    return fmt if fmt != NONE else str(dtype).replace("torch.", "")


def release_freed_memory() -> None:
    """Hand the full-precision layers' freed memory back to the system. glibc keeps freed chunks
    below its mmap threshold in the heap, where resident memory would still count them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
