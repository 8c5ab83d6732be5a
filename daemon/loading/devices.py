"""Which device and dtype a model runs on: `auto` resolved to CUDA, MPS or the CPU, and to bfloat16
where the device computes it natively, else float32. Refusals are ModelLoadErrors an operator can act on."""

from __future__ import annotations

from daemon.errors import ModelLoadError


def resolve_device(spec: str):
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu" or spec == "mps" or spec == "cuda" or spec.startswith("cuda:"):
        device = torch.device(spec)
    else:
        raise ModelLoadError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} requested but CUDA is not available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as torch reports it.
    There a forward in bfloat16 is about twice as fast as in float32 (BENCHMARKS.md, "Weight
    formats"); without, bfloat16 is emulated and slower than float32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve_dtype(spec: str, device):
    """bfloat16 where the device supports it (on a CPU: natively), else float32; never float16
    unless asked for by name (Qwen3 models are known to overflow to NaN in float16)."""
    import torch

    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    spec = spec.strip().lower()
    if spec != "auto":
        if spec not in names:
            raise ModelLoadError(f"unknown dtype {spec!r}: use auto, bfloat16, float32 or float16")
        return names[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "mps":
        try:
            torch.zeros(1, dtype=torch.bfloat16, device=device)
            return torch.bfloat16
        except (RuntimeError, TypeError):
            return torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# -- loading ----------------------------------------------------------------------------------------
