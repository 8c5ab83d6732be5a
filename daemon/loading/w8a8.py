"""w8a8: linear layers computed in int8, weights and activations both.

Each weight row (output channel) is int8 with its own scale (symmetric absmax / 64). Each token's
activations are quantized at run time with their own scale (absmax / 127): a row's result depends
on that row alone, so an input's vector is the same alone and in any batch. The int8 products are
summed exactly in int32 and scaled back to floats by the two scales.

Why the weights use 7 bits of int8 (|w| <= 64): on x86 CPUs without VNNI (AVX2, AVX-512F), int8
kernels add pairs of uint8 x int8 products in int16 with saturation (`vpmaddubsw`). The activation
is the uint8 (its value + 128), so with 8-bit weights a pair reaches 2 * 255 * 127 = 64,770 >
32,767 and the sum saturates: measured here, a 256-deep dot product off by 4 million. One operand
must give up a bit; with |w| <= 64 a pair is at most 32,640, every sum is exact on every x86 CPU,
and CUDA gets the same integers, so a vector does not depend on the machine that made it. The
weights give it up, not the activations: activations carry the heavy tails (the MLP's down
projection takes silu(gate) * up), and there a 7-bit activation made a layer's error 0.054 against
0.032 with 7-bit weights (equal, 0.020, on Gaussian inputs; bench/w8a8.py measures the model's own).

The kernel, chosen by measurement on an AVX2 host (2 cores, 2048x6144 layers; BENCHMARKS.md):
- x86 CPUs: fbgemm (`torch.ops.quantized`, its fp32-output entry point: the int32 sums come back
  scaled by the weights' scales, never requantized): 146-174 GOP/s at 8-256 tokens against float32's
  17-93 GFLOP/s, 0.76 ms for one token. oneDNN's `qlinear_pointwise` (plain int8 tensors, the path
  torch's compiler uses on AMX) reached 189 GOP/s at 256 tokens but spent ~2 ms on every call here,
  whatever its size (196 calls per forward of the 2B model: 0.4 s on each query), and `torch._int_mm`
  has no AVX2 kernel (0.6 GOP/s). fbgemm's packed weight is the layer's only copy: resident memory
  grew 1.13 bytes per weight for the 2B model's 2048x6144 layers (freed memory returned first),
  against 2 in bfloat16 and 4 in float32.
- CUDA: `torch._int_mm` (int8 tensor cores), with the same integers (rows padded to 32: it needs
  more than 16).
- Elsewhere (MPS, ARM CPUs, x86 without AVX2) there is no int8 kernel worth the name: refused.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
import warnings

ACTIVATION_LEVELS = 127
ACTIVATION_ZERO = 128  # fbgemm takes activations as uint8 with a zero point: q + 128 in 1..255
WEIGHT_LEVELS = 64  # |w| <= 64: exact sums under vpmaddubsw's int16 saturation (see above)
CPU_ISAS = ("AVX2", "AVX512")  # torch.backends.cpu.get_cpu_capability() values fbgemm has kernels for
CUDA_MIN_ROWS = 32  # torch._int_mm on CUDA needs more than 16 rows
PACKED_ROW_BYTES = 12  # fbgemm per output channel: its column offset, scale and zero point
X86 = ("x86_64", "amd64", "i686", "x86")


class W8A8Unavailable(Exception):
    """No int8 kernel here; the message is one line naming what to pass instead."""


def check_device(device) -> None:
    """Raise W8A8Unavailable where w8a8 has no int8 kernel on `device`."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return
    if kind == "mps":
        raise W8A8Unavailable("w8a8 computes in int8 on x86 CPUs (AVX2 or newer) and CUDA GPUs; MPS has no int8 "
                              "matrix kernel in torch: pass int8 (int8 weights, computed in the dtype) or none")
    isa = torch.backends.cpu.get_cpu_capability()
    machine = platform.machine().lower()
    if machine not in X86 or isa not in CPU_ISAS or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise W8A8Unavailable(f"w8a8 needs an int8 kernel: an x86-64 CPU with AVX2 or newer, or a CUDA GPU; this CPU "
                              f"is {machine or 'unknown'} with torch's {isa} kernels: pass int8 (int8 weights, computed "
                              "in the dtype) or none")


def quantize_weight(weight):
    """(int8 rows with |w| <= 64, float32 scale per row) of a (out, in) weight: symmetric absmax per row."""
    import torch

    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_LEVELS
    return torch.round(weight / scale.unsqueeze(1)).clamp(-WEIGHT_LEVELS, WEIGHT_LEVELS).to(torch.int8), scale


def quantize_tokens(x):
    """(integer-valued float32 q with |q| <= 127, float32 scale per row) of a (rows, in) activation."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / ACTIVATION_LEVELS
    return (x / scale).round_().clamp_(-ACTIVATION_LEVELS, ACTIVATION_LEVELS), scale


# torch's quantized engine is one setting for the process: two loads packing at once must not
# restore each other's fbgemm as the process's engine.
_ENGINE_LOCK = threading.Lock()


@contextlib.contextmanager
def _fbgemm_engine():
    """fbgemm as torch's quantized engine while a weight is packed (the packed weight keeps it)."""
    import torch

    with _ENGINE_LOCK:
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            with warnings.catch_warnings():  # torch's notice that quantized tensors are deprecated
                warnings.simplefilter("ignore", UserWarning)
                yield
        finally:
            torch.backends.quantized.engine = before


def pack_cpu(qweight, scale):
    """fbgemm's packed form of int8 rows `qweight` with per-row `scale`."""
    import torch

    zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
    with _fbgemm_engine():
        quantized = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(quantized, None)


def matmul_cpu(q, packed):
    """int8 q (as integer-valued float32) times the packed weight, summed in int32, scaled by the
    weights' scales, as float32."""
    import torch

    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q.contiguous(), 1.0, ACTIVATION_ZERO,
                                                                             packed)


def matmul_int_mm(q, qweight_t, scale):
    """The same product through torch._int_mm (CUDA's int8 tensor cores; on a CPU, a reference)."""
    import torch

    rows = q.shape[0]
    pad = max(0, CUDA_MIN_ROWS - rows) if q.is_cuda else 0
    q8 = torch.nn.functional.pad(q, (0, 0, 0, pad)).to(torch.int8)
    return (torch._int_mm(q8, qweight_t)[:rows].float() * scale)


@functools.cache
def linear_class():
    import torch

    class W8A8Linear(torch.nn.Module):
        """nn.Linear's product with int8 weights and per-token int8 activations (module docstring)."""

        def __init__(self, linear: torch.nn.Linear, device):
            super().__init__()
            qweight, scale = quantize_weight(linear.weight.detach().to(device))
            self._hold(qweight, scale, None if linear.bias is None else linear.bias.detach().to(device))

        @classmethod
        def from_rows(cls, qweight, scale, bias=None):
            """The layer of int8 rows `qweight` (|w| <= 64) with float32 per-row `scale`, as `rows`
            gives them (the weights cache), on their device."""
            layer = cls.__new__(cls)
            torch.nn.Module.__init__(layer)
            layer._hold(qweight, scale, bias)
            return layer

        def _hold(self, qweight, scale, bias) -> None:
            self.out_features, self.in_features = qweight.shape
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.on_cuda = qweight.is_cuda
            if self.on_cuda:
                self.register_buffer("qweight_t", qweight.t())  # column-major, as cuBLASLt takes it
                self.register_buffer("scale", scale)
                self.packed = None
            else:
                self.packed = pack_cpu(qweight, scale)
            self.packed_bytes = 0 if self.on_cuda else qweight.numel() + PACKED_ROW_BYTES * qweight.shape[0]

        def rows(self):
            """(int8 rows, float32 scale per row): what the layer computes with, from fbgemm's packed
            copy on the CPU."""
            if self.on_cuda:
                return self.qweight_t.t().contiguous(), self.scale
            with _fbgemm_engine():
                quantized, _ = torch.ops.quantized.linear_unpack(self.packed)
            return quantized.int_repr().contiguous(), quantized.q_per_channel_scales().float()

        def forward(self, x):
            rows = x.reshape(-1, self.in_features)
            q, token_scale = quantize_tokens(rows)
            out = matmul_int_mm(q, self.qweight_t, self.scale) if self.on_cuda else matmul_cpu(q, self.packed)
            # A row with an infinite or NaN activation has no scale: its output is NaN (the daemon
            # refuses non-finite vectors), never the kernel's reading of NaN codes.
            out = torch.where(torch.isfinite(token_scale), out * token_scale, torch.nan)
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and tokens"

    return W8A8Linear
