"""The weights cache: a quantized model kept on disk as it was converted, per model fingerprint and
recipe, so that a restart or an on-demand reload loads int8, nf4 or w8a8 weights directly instead of
reading the full-precision ones and converting them again.

An entry is one safetensors file (every parameter and buffer of the converted model: a quantized
tensor as its inner tensors, a w8a8 layer as its int8 rows and scales; the layout that puts them
back in the file's metadata) and a small JSON sidecar with the entry's sha256. Both live in a
directory of the daemon's own (beside the fingerprint cache, mode 0700) and are trusted only when
the daemon's user owns them and nobody else can write them. An entry is never served blindly: its
key (fingerprint, recipe, dtype, device type, torch and torchao versions) must match, and its bytes
must have the digest the sidecar says, checked as they are read unless the digest cache knows the
file's identity (size, mtime, ctime, inode, device) from a read that checked it. A corrupt,
truncated, foreign or stale entry is deleted and rebuilt from the model's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ModelLoadError, first_line
from daemon.inputs.files import SettingFileError, read_setting_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what an entry holds, or how it is laid out, changes
ENTRY, SIDECAR = ".safetensors", ".json"
SIDECAR_MAX_BYTES = 1 << 20
WRITE_SLACK = 1.1  # free disk an entry needs, over its size, before it is written
_W8A8, _TABLE = "w8a8", "int8_table"


def _writer_alive(temporary: Path) -> bool:
    """Whether the process that names a temporary entry file (`.NAME.PID.XXXX`) still runs."""
    parts = temporary.name.rsplit(".", 2)
    try:
        os.kill(int(parts[-2]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class BadEntry(Exception):
    """An entry that must not be served; the message says why."""


@dataclass(frozen=True)
class CacheKey:
    value: str  # the entry's name
    fingerprint: str  # the model files' fingerprint
    model: str  # the model's name, for the log and for replacing its older entries
    fmt: str
    dtype: str
    device: str  # device type


class WeightsCache:
    """Entries in `directory`; `digests` (the fingerprint cache's file) remembers checked entries."""

    def __init__(self, directory: Path, digests: Path | None = None):
        self.directory = directory
        self.digests = digests

    # -- keys and the directory ------------------------------------------------------------------
    @staticmethod
    def key(fingerprint: str, model: str, fmt: str, dtype, device) -> CacheKey:
        """`model`: what the entry holds (its class and source): an embedding and a reranker built
        from one checkpoint are two entries."""
        import torch

        from daemon.loading.weights import RECIPES

        try:
            from importlib.metadata import version

            torchao = version("torchao")
        except Exception:  # not installed: w8a8 needs none
            torchao = ""
        dtype_name, device_type = str(dtype).replace("torch.", ""), getattr(device, "type", str(device))
        import transformers

        from daemon import __version__

        # The software too: an entry holds buffers transformers computes (the rotary frequencies) and
        # the daemon's own layers, so an upgrade of either converts once more.
        named = json.dumps([CACHE_VERSION, fingerprint, model, fmt, RECIPES[fmt], dtype_name, device_type,
                            torch.__version__, torchao, transformers.__version__, __version__])
        return CacheKey(hashlib.sha256(named.encode()).hexdigest()[:24], fingerprint, model, fmt, dtype_name,
                        device_type)

    def paths(self, key: CacheKey) -> tuple[Path, Path]:
        return self.directory / f"{key.value}{ENTRY}", self.directory / f"{key.value}{SIDECAR}"

    def stats(self) -> dict:
        """What `health` shows: the entries' bytes on disk, their count, and entries being written
        (their temporary files: any daemon's, so this needs no state of its own)."""
        sizes, writing = [], 0
        try:
            for path in self.directory.iterdir():
                if path.name.startswith(".") and ENTRY in path.name:
                    writing += _writer_alive(path)
                elif path.suffix == ENTRY:
                    sizes.append(path.stat().st_size)
        except OSError:
            pass
        return {"bytes": sum(sizes), "entries": len(sizes), "writing": writing}

    def sweep(self) -> None:
        """Delete the temporary files of writers that died (a daemon stopped while writing)."""
        try:
            for path in self.directory.glob(".*"):
                if (ENTRY in path.name or SIDECAR in path.name) and not _writer_alive(path):
                    path.unlink(missing_ok=True)
        except OSError:
            pass

    # -- loading ---------------------------------------------------------------------------------
    def has(self, key: CacheKey) -> bool:
        """Whether an entry (good or not) is there to try; not when the directory cannot be searched."""
        try:
            return any(path.exists() for path in self.paths(key))
        except OSError as exc:
            log.warning("weights cache %s not used (%s)", self.directory, exc.strerror or exc)
            return False

    def load(self, key: CacheKey, cls, settings, directory: Path, dtype, device):
        """The model of entry `key` (a loading.Loaded), or None when there is none or it must not
        be served (then it is deleted, and the caller converts and saves it again)."""
        entry, sidecar = self.paths(key)
        if not self.has(key):
            return None
        try:
            return self._load(key, entry, sidecar, cls, settings, directory, dtype, device)
        except (BadEntry, ModelLoadError, SettingFileError, FileNotFoundError, ValueError, KeyError, TypeError,
                AttributeError) as exc:  # what the entry holds is wrong: it goes
            log.warning("%s: weights cache entry %s not used (%s); converting from the model's files again",
                        key.model, entry.name, first_line(exc))
            self._discard(key)
        except (OSError, RuntimeError, MemoryError) as exc:  # this attempt failed (out of memory, I/O): it stays
            log.warning("%s: weights cache entry %s not loaded (%s); converting from the model's files this time",
                        key.model, entry.name, first_line(exc))
        return None

    def _load(self, key, entry, sidecar, cls, settings, directory, dtype, device):
        from daemon.loading.fingerprint import DigestCache
        from daemon.loading.build import Loaded
        from daemon.loading.reader import Target, read_files

        about = json.loads(read_setting_file(sidecar, SIDECAR_MAX_BYTES, private=True))
        if not isinstance(about, dict) or about.get("key") != key.value or about.get("version") != CACHE_VERSION:
            raise BadEntry("its sidecar names another entry")
        want = about.get("sha256")
        if not (isinstance(want, str) and len(want) == 64):
            raise BadEntry("its sidecar states no sha256")
        digests = DigestCache(self.digests)
        real, st = os.path.realpath(entry), os.stat(entry)
        known = digests.get(real, st) == want
        began = time.monotonic()
        # Known: the very file whose bytes were checked (its identity, before and after the read).
        tensors, reads = read_files([entry], lambda e: Target(None, device),
                                    expect={entry: tuple(DigestCache.identity(st))} if known else None,
                                    hashed=frozenset() if known else frozenset({entry}), private=True)
        if not known:
            if reads[0].digest != want:
                raise BadEntry("its bytes do not have the digest its sidecar says")
            digests.put_identity(real, reads[0].identity, want)
            digests.save()
        seconds = time.monotonic() - began
        log.info("%s: %.2f GB of weights read in %.2f s (%.2f GB/s) from the weights cache%s", key.model,
                 reads[0].bytes / 1e9, seconds, reads[0].bytes / max(seconds, 1e-9) / 1e9,
                 "" if known else ", checked against its digest")
        layout = json.loads(reads[0].metadata.get("layout", "null"))
        if not isinstance(layout, dict) or layout.get("key") != key.value:
            raise BadEntry("its layout names another entry")
        model = rebuild(cls, settings, directory, dtype, device, layout, tensors)
        return Loaded(model, {"missing_keys": []}, reads[0].bytes, cached=True)

    # -- saving ----------------------------------------------------------------------------------
    @staticmethod
    def snapshot(model) -> "Snapshot":
        """The model as it is now (its owner may go on changing it: the reranker drops its LM head)."""
        return Snapshot.of(model)

    def save_later(self, key: CacheKey, snapshot: "Snapshot") -> threading.Thread:
        """Write the entry of a model's `snapshot` on a thread of its own: the model serves
        meanwhile. Returns the thread."""
        thread = threading.Thread(target=self.save, args=(key, snapshot), name="qwen3vl-weights-cache", daemon=True)
        thread.start()
        return thread

    def save(self, key: CacheKey, snapshot: "Snapshot") -> None:
        """Write the entry of a model's `snapshot` atomically (a temporary file renamed), its
        sidecar, and drop the model's entries of other keys (older files or versions). Failures are
        logged: a cache."""
        began = time.monotonic()
        try:
            tensors, layout = flatten(snapshot)
            layout["key"] = key.value
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.sweep()
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            free = os.statvfs(self.directory)
            if free.f_bavail * free.f_frsize < size * WRITE_SLACK:
                log.info("%s: weights cache entry not written: %.2f GB free in %s, it needs %.2f GB", key.model,
                         free.f_bavail * free.f_frsize / 1e9, self.directory, size * WRITE_SLACK / 1e9)
                return
            entry, sidecar = self.paths(key)
            digest = _write_atomically(entry, lambda f: write_safetensors(f, tensors, {"layout": json.dumps(layout)}))
            about = {"version": CACHE_VERSION, "key": key.value, "sha256": digest, "bytes": entry.stat().st_size,
                     "model": key.model, "fingerprint": key.fingerprint, "format": key.fmt, "dtype": key.dtype,
                     "device": key.device, "written": time.time()}
            _write_atomically(sidecar, lambda f: f.write(json.dumps(about).encode()))
            self._drop_superseded(key)
            log.info("%s: weights cache entry %s written (%.2f GB in %.1f s)", key.model, entry.name, size / 1e9,
                     time.monotonic() - began)
        except Exception as exc:  # a cache: the daemon serves without it
            log.warning("%s: weights cache entry not written (%s)", key.model, first_line(exc))

    def _drop_superseded(self, key: CacheKey) -> None:
        """Entries of the same model, format, dtype and device under another key: its files or the
        software changed, so they can never be served again."""
        for sidecar in self.directory.glob(f"*{SIDECAR}"):
            if sidecar.stem == key.value:
                continue
            try:
                about = json.loads(read_setting_file(sidecar, SIDECAR_MAX_BYTES, private=True))
            except (OSError, SettingFileError, ValueError):
                continue
            if isinstance(about, dict) and [about.get(k) for k in ("model", "format", "dtype", "device")] == \
                    [key.model, key.fmt, key.dtype, key.device]:
                self._discard(CacheKey(sidecar.stem, "", key.model, key.fmt, key.dtype, key.device))

    def _discard(self, key: CacheKey) -> None:
        for path in self.paths(key):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete %s (%s)", path, exc.strerror or exc)


def _write_atomically(path: Path, write) -> str | None:
    """`write(f)` into a temporary file beside `path` (named for this process, so that one left by a
    daemon that died writing is known and swept), then renamed over it; returns what `write` did."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            done = write(f)
        os.replace(tmp, path)
        return done
    except BaseException:
        os.unlink(tmp)
        raise


def write_safetensors(f, tensors: dict, metadata: dict[str, str]) -> str:
    """`tensors` (contiguous, any device) in the safetensors format into the open file `f`; returns
    the sha256 of every byte written."""
    from daemon.loading.reader import DTYPES

    names = {torch_name: code for code, torch_name in DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[str(tensor.dtype).replace("torch.", "")], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    for chunk in (len(raw).to_bytes(8, "little"), raw):
        f.write(chunk)
        digest.update(chunk)
    for tensor in tensors.values():
        data = memoryview(_bytes(tensor))
        f.write(data)
        digest.update(data)
    return digest.hexdigest()


class _Rows:
    """A w8a8 layer's int8 rows (part 0) or scales (part 1), unpacked from fbgemm's packed copy only
    when written: one layer's copy at a time, not the whole model's."""

    def __init__(self, module, part: int):
        import torch

        self.module, self.part = module, part
        out, inner = module.out_features, module.in_features
        self.shape, self.dtype = ((out, inner), torch.int8) if part == 0 else ((out,), torch.float32)

    def numel(self) -> int:
        return self.shape[0] * (self.shape[1] if len(self.shape) > 1 else 1)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def contiguous(self) -> "_Rows":
        return self

    def materialize(self):
        return self.module.rows()[self.part]


def _bytes(tensor):
    """A tensor's elements, in order, as bytes (a copy only where its layout is not dense)."""
    import torch

    if isinstance(tensor, _Rows):
        tensor = tensor.materialize()
    flat = tensor.detach().to("cpu").reshape(-1)
    if flat.stride(0) != 1:  # a view of one element can keep its base's stride (and clone keeps it too)
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return flat.view(torch.uint8).numpy()


# -- a model as tensors and a layout, and back ------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """A model's modules, parameters and buffers by name, as they are when taken (references)."""

    modules: tuple
    params: tuple
    buffers: tuple

    @classmethod
    def of(cls, model) -> "Snapshot":
        return cls(tuple(model.named_modules()), tuple(model.named_parameters(remove_duplicate=False)),
                   tuple(model.named_buffers(remove_duplicate=False)))


def flatten(model: Snapshot) -> tuple[dict, dict]:
    """Every parameter and buffer of the converted model as plain tensors by name, and the layout
    that puts them back: the replaced modules, each name's kind (plain, quantized with its class and
    attributes, or another name's alias). BadEntry for what cannot be written (an unknown kind)."""
    from daemon.loading.w8a8 import linear_class
    from daemon.loading.weights import int8_embedding_class, is_quantized_tensor

    tensors, layout = {}, {"version": CACHE_VERSION, "modules": {}, "params": {}, "buffers": {}}
    inside_w8a8 = set()
    for name, module in model.modules:
        if isinstance(module, linear_class()):
            layout["modules"][name] = _W8A8
            tensors[f"w8a8/{name}/qweight"], tensors[f"w8a8/{name}/scale"] = _Rows(module, 0), _Rows(module, 1)
            inside_w8a8.add(name)
        elif isinstance(module, int8_embedding_class()):
            layout["modules"][name] = _TABLE
    for group, items in (("params", model.params), ("buffers", model.buffers)):
        seen: dict[int, str] = {}
        for name, value in items:
            owner = name.rpartition(".")[0]
            if owner in inside_w8a8 and not name.endswith(".bias"):
                continue  # its rows and scales above
            if id(value) in seen:
                layout[group][name] = {"alias": seen[id(value)]}
                continue
            seen[id(value)] = name
            data = value.data if group == "params" else value
            spec = {"grad": bool(getattr(value, "requires_grad", False))}
            if is_quantized_tensor(data):
                inner, attributes = data.__tensor_flatten__()
                spec.update({"class": _class_name(type(data)), "inner": list(inner), "attributes": _encode(attributes),
                             "size": list(data.shape), "stride": list(data.stride())})
                for part in inner:
                    tensors[f"{group}/{name}/{part}"] = getattr(data, part)
            else:
                tensors[f"{group}/{name}"] = data
            layout[group][name] = spec
    return {k: v.contiguous() for k, v in tensors.items()}, layout


def rebuild(cls, settings, directory: Path, dtype, device, layout: dict, tensors: dict):
    """The model that `flatten` wrote: built empty (on the meta device) from the config, its
    replaced modules put back, every parameter and buffer set; BadEntry if any is left unset."""
    import torch

    from daemon.loading.build import config_of
    from daemon.loading.w8a8 import linear_class
    from daemon.loading.weights import int8_embedding_class

    config = config_of(cls, settings, directory)
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation=settings.attn_implementation, dtype=dtype)
    params = layout["params"]
    for name, kind in layout["modules"].items():
        if kind == _W8A8:
            bias = tensors.get(f"params/{name}.bias") if f"{name}.bias" in params else None
            module = linear_class().from_rows(tensors[f"w8a8/{name}/qweight"], tensors[f"w8a8/{name}/scale"], bias)
        elif kind == _TABLE:
            module = int8_embedding_class().from_rows(tensors[f"buffers/{name}.rows"], tensors[f"buffers/{name}.scales"])
        else:
            raise BadEntry(f"an unknown module kind {str(kind)[:40]!r}")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
    for group in ("params", "buffers"):
        placed: dict[str, object] = {}
        for name, spec in layout[group].items():
            if "alias" in spec:
                value = placed[spec["alias"]]
            else:
                value = tensors[f"{group}/{name}"] if "class" not in spec else _unflatten(group, name, spec, tensors,
                                                                                          device)
                if group == "params":
                    value = torch.nn.Parameter(value, requires_grad=bool(spec.get("grad")))
            placed[name] = value
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            before = getattr(owner, leaf, None)
            if before is not None and tuple(before.shape) != tuple(value.shape):
                raise BadEntry(f"{name} has shape {tuple(value.shape)}, the model {tuple(before.shape)}")
            (owner._parameters if group == "params" else owner._buffers)[leaf] = value
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise BadEntry(f"it leaves {len(left)} weight(s) unset (e.g. {left[0]})")
    return model.eval()


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _quantized_classes() -> dict[str, type]:
    """The tensor classes an entry may name: the formats' own, never an arbitrary import."""
    found = {}
    try:
        from torchao.quantization import Int8Tensor

        found[_class_name(Int8Tensor)] = Int8Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

        found[_class_name(NF4Tensor)] = NF4Tensor
        from torchao.quantization import Float8Tensor

        found[_class_name(Float8Tensor)] = Float8Tensor
    except ImportError:
        pass
    return found


def _unflatten(group: str, name: str, spec: dict, tensors: dict, device):
    import torch

    cls = _quantized_classes().get(spec["class"])
    if cls is None:
        raise BadEntry(f"{name} is of a tensor class this daemon does not load ({str(spec['class'])[:80]})")
    inner = {part: tensors[f"{group}/{name}/{part}"] for part in spec["inner"]}
    return cls.__tensor_unflatten__(inner, _decode(spec["attributes"], device), torch.Size(spec["size"]),
                                    tuple(spec["stride"]))


def _encode(value):
    """A quantized tensor's attributes as JSON: plain values, lists, tuples, dicts, torch sizes,
    dtypes and devices, and torchao's SubclassTensorArgs; BadEntry for anything else."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if type(value).__name__ == "SubclassTensorArgs":  # torchao's NF4 metadata, a dataclass
        return {"$args": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return {"$list" if isinstance(value, list) else "$tuple": [_encode(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: _encode(v) for k, v in value.items()}}
    raise BadEntry(f"an attribute of type {type(value).__name__} cannot be written")


def _decode(value, device):
    """`_encode` inverted; a device is the one the model loads on (the key fixed its type)."""
    import torch

    if not isinstance(value, dict):
        return value
    (tag, inner), = value.items()
    if tag == "$dtype":
        dtype = getattr(torch, inner, None)
        if not isinstance(dtype, torch.dtype):
            raise BadEntry(f"an unknown dtype {str(inner)[:20]!r}")
        return dtype
    if tag == "$device":
        return torch.device(device)
    if tag == "$size":
        return torch.Size(inner)
    if tag == "$args":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

        return SubclassTensorArgs(**{k: _decode(v, device) for k, v in inner.items()})
    if tag in ("$list", "$tuple"):
        items = [_decode(v, device) for v in inner]
        return items if tag == "$list" else tuple(items)
    if tag == "$dict":
        return {k: _decode(v, device) for k, v in inner.items()}
    raise BadEntry(f"an unknown attribute tag {str(tag)[:20]!r}")
