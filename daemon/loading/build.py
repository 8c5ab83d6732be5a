"""Building a Qwen3-VL model from its directory: its weights read once into the memory it will own
(reader.py), handed to transformers' `from_pretrained` as a state dict so that its own key mapping,
tying and checks apply unchanged; in a quantized format, converted layer by layer (weights.py) or
loaded ready-made from the weights cache (weights_cache.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import ModelSettings
from daemon.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    model: Any  # the transformers model
    info: dict  # from_pretrained's loading info (missing keys)
    bytes_read: int  # weight bytes read from files
    cached: bool = False  # loaded from the weights cache


def weight_identities(found) -> dict[Path, tuple]:
    """What each weight file of a Fingerprint was when hashed, by path: the reader refuses a file
    that is not that file any more."""
    if found is None or found.directory is None:
        return {}
    return {found.directory / name: tuple(identity[1]) for name, identity in found.identities}


def config_of(cls, settings: ModelSettings, directory: Path):
    try:
        return cls.config_class.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the config of {settings.name!r} in {directory}: {first_line(exc)}") \
            from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {settings.name!r}: {first_line(exc)}") from None


class Background:
    """`work()` on a thread of its own; `result()` waits for it (and raises what it raised)."""

    def __init__(self, work):
        pool = ThreadPoolExecutor(1, thread_name_prefix="qwen3vl-weights")
        self._future = pool.submit(work)
        pool.shutdown(wait=False)

    def result(self):
        return self._future.result()

    def take(self):
        """`result()`, no longer held here: what it holds is freed with its last other owner."""
        future, self._future = self._future, None
        return future.result()


class WeightsRead(Background):
    """The weight files of `directory` being read on a thread of their own (reader.py), each
    floating tensor in `dtype` ("auto": the file's) on `device`, while the caller loads the
    processor: the reading threads wait on the kernel, the tokenizer's parsing on the CPU.
    `found` (the directory's Fingerprint): each weight file must still be what it hashed.
    `unused`: name prefixes of tensors the model has no place for (not read)."""

    def __init__(self, directory: Path, dtype, device, found=None, hash_unknown: bool = False,
                 unused: tuple[str, ...] = ()):
        from daemon.loading.fingerprint import loaded_weight_files
        from daemon.loading.reader import Target

        self.paths = loaded_weight_files(directory)
        self._target = Target(None if dtype == "auto" else dtype, device)
        self._expect, self._unused = weight_identities(found), unused
        self._digests = {found.directory / name: digest for name, digest in found.digests if digest} \
            if found is not None else {}
        pending = {found.directory / name for name in found.pending} if found is not None else set(self.paths)
        self._hashed = frozenset(p for p in self.paths if p in pending) if hash_unknown else frozenset()
        super().__init__(self._read)

    def hashed(self) -> dict[str, tuple[str, tuple]]:
        """(sha256, identity as read) of each file hashed as it passed, by path (waits for the read)."""
        _, reads = self.result()
        return {str(r.path): (r.digest, r.identity) for r in reads if r.digest is not None}

    def _read(self):
        """(tensors by name, FileReads); the read's ModelLoadError is raised by `result`."""
        from daemon.loading.reader import read_files

        began = time.monotonic()
        try:
            return read_files(self.paths, lambda entry: self._target, self._expect, self._hashed,
                              wanted=(lambda name: not name.startswith(self._unused)) if self._unused else None,
                              digests=self._digests)
        except ModelLoadError:
            raise
        except Exception as exc:  # a fault no check foresaw: still one line, naming the files
            raise ModelLoadError(f"cannot load weights from {', '.join(map(str, self.paths))[:200]}: "
                                 f"{first_line(exc)}") from None
        finally:
            self.seconds = time.monotonic() - began


class Placed:
    """A tensor already on the accelerator that keeps it, as transformers' loader takes a state
    dict's values (`value[...]`, then `.to(device=, dtype=)`): it stays where it is. The loader
    places tensors by its device map, the CPU without one; with one naming the accelerator it would
    first reserve another model's worth of device memory (its allocator warm-up), which a GPU
    shared with an LLM may not have."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __getitem__(self, index):
        return self if index is Ellipsis else self.tensor[index]

    def to(self, device=None, dtype=None, **_):
        return self.tensor if dtype is None or dtype == self.tensor.dtype else self.tensor.to(dtype)


def from_files(cls, settings: ModelSettings, directory: Path, dtype, device, weights: WeightsRead) -> Loaded:
    """The model of `directory` built by transformers over the tensors `weights` read (its key
    mapping, tying and checks unchanged); refuses missing base weights."""
    config = config_of(cls, settings, directory)
    tensors, reads = weights.take()  # the model owns them now: a format's conversion frees the originals
    state = tensors if device.type == "cpu" else {name: Placed(t) for name, t in tensors.items()}
    try:
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, attn_implementation=settings.attn_implementation,
            output_loading_info=True)
    except Exception as exc:  # whatever transformers raises on a broken checkpoint: one line
        raise ModelLoadError(f"cannot load model {settings.name!r}: {first_line(exc)}") from None
    del tensors, state
    model.to(device)  # the buffers transformers computes (rotary frequencies); the weights are there already
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("lm_head")]
    if missing:
        raise ModelLoadError(
            f"checkpoint {settings.name!r} lacks {len(missing)} base-model weight(s) (e.g. {missing[0]}); "
            "refusing to run with randomly initialised layers"
        )
    read = sum(r.bytes for r in reads)
    log.info("%s: %.2f GB of weights read in %.2f s (%.2f GB/s)%s", settings.name, read / 1e9, weights.seconds,
             read / max(weights.seconds, 1e-9) / 1e9, ", hashed as they passed" if any(r.digest for r in reads) else "")
    return Loaded(model, info, read)

