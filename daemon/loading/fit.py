"""Will the models fit? Their memory estimated before any weight is read, against what the device
has free, so that a start that cannot fit stops in a second with advice instead of swapping or
dying of an out-of-memory error minutes into loading.

The estimate comes from the checkpoint's safetensors headers (each tensor's name, dtype and shape:
a few kB read per file) and the chosen dtype and weight format, counted as weights.py will hold
them, plus the working memory of one full batch. What the device has free: CUDA's free memory, MPS's
recommended maximum less what Metal already holds, on the CPU MemAvailable and the cgroup's room.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ModelLoadError
from daemon.inputs.files import SettingFileError, open_regular
from daemon.loading.reader import HEADER_MAX_BYTES, MAX_ELEMENTS
from daemon.loading.w8a8 import PACKED_ROW_BYTES
from daemon.loading.weights import FP8, INT8, NF4, NF4_BLOCK, NONE, QUANTIZED, W8A8

MAX_WIDTH = 1 << 20  # hidden and intermediate sizes (8B: 4096 and 12288)
GB = 1e9
# Stored dtypes (safetensors names) and their bytes per element.
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_STORED = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_WEIGHT = re.compile(r"(^|\.)language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
INT8_TABLE = re.compile(r"(^|\.)language_model\.embed_tokens\.weight$")  # int8 rows in any quantized format
NOT_HELD = re.compile(r"^lm_head\.")  # the embedding model has no LM head; the reranker drops it once loaded
# Activations of one forward per token of the batch, in units of the compute dtype: the residual
# stream, q/k/v and attention output (~4 x hidden) and the MLP's gate, up and product (~3 x
# intermediate), twice over for the allocator's slack and the layer that is being freed.
ACTIVATION_FACTOR = 2


@dataclass(frozen=True)
class Shape:
    """What a checkpoint holds, from its headers and config: enough to estimate any format."""

    tensors: tuple[tuple[str, str, int, int], ...]  # (name, stored dtype, elements, rows)
    hidden_size: int
    intermediate_size: int


@dataclass(frozen=True)
class Estimate:
    kind: str  # embedding, reranker
    weights_bytes: int
    working_bytes: int
    transient_bytes: int = 0  # held only while loading: the reranker's untied LM head

    @property
    def total(self) -> int:
        return self.weights_bytes + max(self.working_bytes, self.transient_bytes)


@dataclass(frozen=True)
class Free:
    bytes: int
    source: str  # how it was found, for the message


def size(n: int) -> str:
    """Bytes for a person: GB with two decimals, MB below a GB (test models)."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def read_header(path: Path) -> dict:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}."""
    try:
        with open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: not a safetensors file (shorter than its header)")
            (size,) = struct.unpack("<Q", head)
            if size > HEADER_MAX_BYTES:
                raise ModelLoadError(f"{path}: not a safetensors file (a header of {size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, SettingFileError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    except (ValueError, RecursionError):
        raise ModelLoadError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def checkpoint_shape(directory: Path) -> Shape:
    from daemon.inputs.files import read_setting_file
    from daemon.loading.fingerprint import loaded_weight_files
    from daemon.loading.preflight import CONFIG_MAX_BYTES

    tensors = []
    for file in loaded_weight_files(directory):
        for name, entry in read_header(file).items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            numel, rows = _elements(entry.get("shape"), file, name)
            tensors.append((name, str(entry.get("dtype")), numel, rows))
    text = _checked_sizes(directory, read_setting_file, CONFIG_MAX_BYTES)
    return Shape(tuple(tensors), text["hidden_size"], text["intermediate_size"])


# The text model's sizes the model is built from, and their bounds: a config claiming 10^12 layers
# would have transformers build them (a start that never ends), so each is checked first.
CONFIG_BOUNDS = {"hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH, "num_hidden_layers": 1024,
                 "num_attention_heads": 1024, "num_key_value_heads": 1024, "vocab_size": 1 << 22}


def _checked_sizes(directory: Path, read, max_bytes: int) -> dict:
    try:
        config = json.loads(read(directory / "config.json", max_bytes))
        text = config.get("text_config") or config
        sizes = {key: text.get(key) for key in CONFIG_BOUNDS}
    except (OSError, SettingFileError, ValueError, TypeError, AttributeError, RecursionError):
        sizes = dict.fromkeys(CONFIG_BOUNDS)
    for key in ("hidden_size", "intermediate_size"):
        if not (_is_count(sizes[key]) and 0 < sizes[key] <= MAX_WIDTH):
            raise ModelLoadError(f"{directory}: config.json does not state a hidden_size and an intermediate_size "
                                 f"(whole numbers from 1 to {MAX_WIDTH})")
    for key, bound in CONFIG_BOUNDS.items():
        value = sizes[key]
        if value is not None and not (_is_count(value) and 0 < value <= bound):
            raise ModelLoadError(f"{directory}: config.json's {key} is {str(value)[:40]}, not a whole number from 1 "
                                 f"to {bound}")
    return sizes


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _elements(shape, file: Path, name: str) -> tuple[int, int]:
    """(elements, rows) of a header's shape: a list of non-negative whole numbers, within reason."""
    if not isinstance(shape, list) or not all(_is_count(n) and n >= 0 for n in shape):
        raise ModelLoadError(f"{file}: tensor {name[:80]!r} has no valid shape (a list of whole numbers)")
    numel = 1
    for n in shape:
        numel *= n
    if numel > MAX_ELEMENTS:
        raise ModelLoadError(f"{file}: tensor {name[:80]!r} has no valid shape (2^{numel.bit_length() - 1} elements "
                             "or more)")
    return numel, shape[0] if shape else 1


def weights_bytes(shape: Shape, fmt: str, dtype: str) -> int:
    """What the model's weights hold once loaded in `dtype` with its linear layers in `fmt`."""
    compute = COMPUTE_BYTES[dtype]
    total = 0
    for name, stored, numel, rows in shape.tensors:
        if NOT_HELD.search(name):
            continue
        if fmt in QUANTIZED and QUANTIZED_WEIGHT.search(name):
            total += quantized_bytes(fmt, numel, rows, compute)
        elif fmt in QUANTIZED and INT8_TABLE.search(name):
            total += numel + rows * compute
        elif stored in FLOAT_STORED:
            total += numel * compute
        else:
            total += numel * STORED_BYTES.get(stored, 4)
    return total


def quantized_bytes(fmt: str, numel: int, rows: int, compute: int) -> int:
    """int8: a byte per weight and a scale per row; fp8 and w8a8 likewise (their per-row terms); nf4: half a
    byte per weight, an int8 scale per block of 64, and the scales' own float32 scale and mean."""
    if fmt == INT8:
        return numel + rows * compute
    if fmt == FP8:
        return numel + rows * 4
    if fmt == W8A8:  # fbgemm's packed int8 copy and its per-row terms (w8a8.py); on CUDA, int8 rows and a scale
        return numel + rows * PACKED_ROW_BYTES
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + (blocks // 64 + 1) * 4 + 4


def working_bytes(shape: Shape, batch_tokens: int, dtype: str) -> int:
    per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size
    return ACTIVATION_FACTOR * batch_tokens * per_token * COMPUTE_BYTES[dtype]


def estimate(kind: str, shape: Shape, fmt: str, dtype: str, batch_tokens: int) -> Estimate:
    # The reranker loads its LM head (in the compute dtype) and drops it once the score vector is
    # taken; the embedding model never loads one. A tied head is the table, not in the files.
    head = sum(numel for name, _, numel, _ in shape.tensors if NOT_HELD.search(name)) if kind == "reranker" else 0
    return Estimate(kind, weights_bytes(shape, fmt, dtype), working_bytes(shape, batch_tokens, dtype),
                    head * COMPUTE_BYTES[dtype])


# -- what is free --------------------------------------------------------------------------------
def cpu_free(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
             own_cgroup: Path = Path("/proc/self/cgroup")) -> Free:
    """MemAvailable, or the room left under this process's cgroup limits where that is less
    (its limit less its usage, its reclaimable file cache counted as room)."""
    available = _meminfo_available(meminfo)
    found = Free(available, f"MemAvailable {size(available)}") if available is not None else None
    room = _cgroup_room(cgroup_root, own_cgroup)
    if room is not None and (found is None or room.bytes < found.bytes):
        found = room
    return found or Free(0, "no /proc/meminfo")


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path, own: Path) -> Free | None:
    """The tightest room among this process's cgroup (v2) and its ancestors, or the v1 memory
    controller's; None where no limit is set."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    best: Free | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # v2: the unified hierarchy
            files, mount = ("memory.max", "memory.current", "inactive_file"), root
        elif "memory" in parts[1].split(","):  # v1: the memory controller
            files, mount = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), root / "memory"
        else:
            continue
        candidates = [_room(level, *files) for level in _levels(mount, parts[2])]
        for room in candidates:
            if room is not None and (best is None or room.bytes < best.bytes):
                best = room
    return best


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and each ancestor up to the mount, where limits may be set. A path
    that is not under the mount as seen here (a container without its own cgroup namespace, which
    sees its own cgroup at the mount) is read at the mount itself."""
    own = mount / path.lstrip("/")
    if not own.is_dir():
        return [mount]
    return [own, *[p for p in own.parents if p == mount or mount in p.parents]]


def _room(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> Free | None:
    try:
        limit_text = (directory / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        limit, usage = int(limit_text), int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    room = max(0, limit - usage + inactive)
    return Free(room, f"cgroup limit {size(limit)}, {size(room)} of it free")


def device_free(device) -> Free:
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return Free(free, f"{size(free)} free of {size(total)} on {device}")
    if device.type == "mps":
        limit = torch.mps.recommended_max_memory()
        room = max(0, limit - torch.mps.driver_allocated_memory())
        return Free(room, f"MPS recommended maximum {size(limit)}, {size(room)} of it free")
    return cpu_free()


# -- the check -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One model to load: what its files hold and how it is asked to hold them."""

    kind: str
    shape: Shape
    fmt: str
    dtype: str  # the resolved compute dtype: float32, bfloat16, float16
    fixed_format: bool = False  # advice keeps its format (an int8 calibration is made for this one)


def need_bytes(estimates: list[Estimate]) -> int:
    """What the models need together: all their weights, and the most of one batch's working memory
    (the engine runs one batch at a time, of either model) or of what one holds only while loading."""
    return sum(e.weights_bytes for e in estimates) + max(
        (max(e.working_bytes, e.transient_bytes) for e in estimates), default=0)


def plan_estimates(plans: list[Plan], batch_tokens: int, fmt: str | None = None,
                   dtype: str | None = None) -> list[Estimate]:
    """Each plan's estimate, or with every model in `fmt` / `dtype` instead (for advice; a model
    whose format is fixed keeps it)."""
    return [estimate(p.kind, p.shape, p.fmt if p.fixed_format else fmt or p.fmt, dtype or p.dtype, batch_tokens)
            for p in plans]


def check_fit(plans: list[Plan], batch_tokens: int, free: Free, budget: int | None,
              bf16_ok: bool, fp8_ok: bool) -> list[Estimate]:
    """The plans' estimates; ModelLoadError, in one line with what would fit, when their sum is
    over what is free or over the operator's budget."""
    estimates = plan_estimates(plans, batch_tokens)
    need = need_bytes(estimates)
    room, where = free.bytes, free.source
    if budget is not None and budget < room:
        room, where = budget, f"--memory-budget is {size(budget)} ({free.source})"
    if need <= room:
        return estimates
    parts = ", ".join(f"{e.kind} {size(e.weights_bytes)}" for e in estimates)
    advice = advise(plans, batch_tokens, room, bf16_ok, fp8_ok)
    raise ModelLoadError(
        f"the models will not fit: they need about {size(need)} ({parts} of weights in "
        f"{_describe(plans)}, {size(max(e.working_bytes for e in estimates))} to run a batch), and "
        f"{where}: {advice} (--no-fit-check skips this check)")


def advise(plans: list[Plan], batch_tokens: int, room: int, bf16_ok: bool, fp8_ok: bool) -> str:
    """The settings that would fit, most faithful first: a smaller batch (the same outputs), then
    bfloat16, then quantizing (int8 before nf4), then one model alone. Formats are named per model
    (--embedding-quantize, --reranker-quantize): those win over --quantize, so only they surely apply."""
    options = []
    smaller = _batch_that_fits(plans, batch_tokens, room)
    if smaller is not None:
        options.append(f"--max-batch-tokens {smaller} (about {size(need_bytes(plan_estimates(plans, smaller)))})")
    for fmt in [NONE, INT8, *([FP8] if fp8_ok else []), NF4]:
        for dtype in ["float32", "bfloat16"] if bf16_ok else ["float32"]:
            if all((p.fixed_format or p.fmt == fmt) and p.dtype == dtype for p in plans):
                continue
            if {p.dtype for p in plans} == {"bfloat16"} and dtype == "float32":
                continue  # never advise more memory per weight than asked for
            need, flags = need_bytes(plan_estimates(plans, batch_tokens, fmt, dtype)), _flags(plans, fmt, dtype)
            if need <= room and not any(option.startswith(f"{flags} (") for option in options):
                options.append(f"{flags} (about {size(need)})")
    if len(plans) > 1:
        for plan in plans:
            alone = need_bytes(plan_estimates([plan], batch_tokens))
            if alone <= room:
                other = next(p.kind for p in plans if p is not plan)
                options.append(f"--{other}-model none to load the {plan.kind} model alone "
                               f"(about {size(alone)})")
                break
    if not options:
        return "nothing smaller fits either; free memory on the device or use a larger one"
    return "pass " + options[0] + (", or " + "; or ".join(options[1:3]) if len(options) > 1 else "")


MIN_ADVISED_BATCH = 512  # tokens: below this a batch of long inputs no longer fits one input


def _batch_that_fits(plans: list[Plan], batch_tokens: int, room: int) -> int | None:
    """The largest batch (halving from the current one, down to 512 tokens) with which the plans fit."""
    tokens = batch_tokens // 2
    while tokens >= MIN_ADVISED_BATCH:
        if need_bytes(plan_estimates(plans, tokens)) <= room:
            return tokens
        tokens //= 2
    return None


def _flags(plans: list[Plan], fmt: str, dtype: str) -> str:
    flags = [f"--dtype {dtype}"] if dtype not in {p.dtype for p in plans} else []
    flags += [f"--{p.kind}-quantize {fmt}" for p in plans if p.fmt != fmt and not p.fixed_format]
    return " ".join(flags)


def _describe(plans: list[Plan]) -> str:
    forms = sorted({f"{p.dtype}" if p.fmt == NONE else f"{p.fmt} ({p.dtype} elsewhere)" for p in plans})
    return " and ".join(forms)


def describe_memory(backends: dict) -> str:
    """For the ready line: each model's weights as measured, beside the start's estimate."""
    parts = []
    for kind, backend in backends.items():
        info = backend.info
        estimated = f", estimated {size(info.memory_estimate_bytes)}" if info.memory_estimate_bytes is not None else ""
        parts.append(f"{kind} {info.weights} {size(info.memory_bytes)}{estimated}")
    return "memory: " + ", ".join(parts) if parts else "memory: no models"

