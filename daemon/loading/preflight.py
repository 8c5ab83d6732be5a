"""Settings checked before anything is bound or loaded, so that a wrong one costs a second, not a
model load, and is told in one line that names it and what to pass instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.config import LOAD_MODES, DaemonConfig, ModelSettings
from daemon.inputs.files import SettingFileError, read_setting_file

DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CONFIG_MAX_BYTES = 16 << 20  # a model's config.json is a few kB


class SettingsError(Exception):
    """A setting that cannot work; the message is one line."""


def looks_local(name: str) -> bool:
    """A directory rather than a hub id: a path that exists, or one written as a path."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1


def check_config(config: DaemonConfig) -> None:
    """Every check that needs no model weights: models enabled, device, dtype, checkpoint files,
    and the embedding dimension against each embedding checkpoint's config."""
    models = [(f"--{kind}-model", s) for kind, s, _ in config.models()]
    if not models:
        raise SettingsError("both models are disabled (--embedding-model and --reranker-model are 'none'): "
                            "enable at least one")
    if config.load not in LOAD_MODES:
        raise SettingsError(f"unknown load mode {config.load!r}: use {' or '.join(LOAD_MODES)}")
    for flag, settings in models:
        _check_dtype(settings.dtype)
        _check_device(settings.device)
        _check_format(flag, settings)
        if looks_local(settings.name):
            _check_checkpoint(flag, settings)
        if flag == "--embedding-model" and config.embedding_dim is not None and looks_local(settings.name):
            size = hidden_size(Path(settings.name).expanduser())
            if size is not None and not 1 <= config.embedding_dim <= size:
                raise SettingsError(f"--embedding-dim {config.embedding_dim} is outside 1..{size}, the size of "
                                    f"{settings.name}: pass at most {size}, or leave it unset for {size}")


def _check_dtype(spec: str) -> None:
    if spec.strip().lower() not in DTYPES:
        raise SettingsError(f"unknown --dtype {spec!r}: use auto, bfloat16, float32 or float16")


def _check_device(spec: str) -> None:
    from daemon.loading.devices import resolve_device
    from daemon.errors import ModelLoadError

    try:
        resolve_device(spec)
    except ModelLoadError as exc:
        raise SettingsError(str(exc).replace("use --device", "pass --device")) from None


def _check_format(flag: str, settings: ModelSettings) -> None:
    """--quantize (or its per-model override): a known format, its library installed, and one the
    device runs (fp8: CUDA 8.9+), told before anything is bound or read."""
    from daemon.loading.devices import resolve_device
    from daemon.loading.weights import FormatError, check_format, parse_format

    option = flag.replace("-model", "-quantize")  # --embedding-quantize, --reranker-quantize
    what = f"the {flag[2:-6]} model's weights ({option}, else --quantize)"
    try:
        check_format(parse_format(settings.quantize, what), resolve_device(settings.device), what)
    except FormatError as exc:
        raise SettingsError(str(exc)) from None


def _check_checkpoint(flag: str, settings: ModelSettings) -> None:
    path = Path(settings.name).expanduser()
    where = f"{flag} {settings.name}"
    if not path.exists():
        raise SettingsError(f"cannot load model {settings.name!r}: no such directory; pass a checkpoint directory "
                            f"or a hub id such as Qwen/Qwen3-VL-Embedding-2B ({flag})")
    if not path.is_dir():
        raise SettingsError(f"{where}: not a directory; pass the checkpoint's directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SettingsError(f"{where}: the directory cannot be read (permission denied); make it readable by "
                            "the daemon's user")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SettingsError(f"{where}: no config.json, so not a model checkpoint; pass the directory that holds "
                            "config.json and the *.safetensors weights")
    _read_json(config_file, where)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise SettingsError(f"{where}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them from the "
                            "model's release")
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise SettingsError(f"{where}: no processor config ({' or '.join(PROCESSOR_FILES)}); copy it from the "
                            "model's release")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = "pickled .bin weights, which are never loaded" if list(path.glob("*.bin")) else "no weights"
        raise SettingsError(f"{where}: {found}; the daemon loads *.safetensors only")
    for file in weights:
        if not os.access(file, os.R_OK):
            raise SettingsError(f"{where}: {file.name} cannot be read (permission denied); make it readable by "
                                "the daemon's user")


def _read_json(file: Path, where: str) -> dict:
    try:
        data = json.loads(read_setting_file(file, CONFIG_MAX_BYTES).decode("utf-8"))
    except PermissionError:
        raise SettingsError(f"{where}: {file.name} cannot be read (permission denied)") from None
    except SettingFileError as exc:  # a FIFO in its place would hang the start: refused unopened
        raise SettingsError(f"{where}: {exc}") from None
    except RecursionError:
        raise SettingsError(f"{where}: {file.name} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: {file.name} is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: {file.name} is not a JSON object")
    return data


def hidden_size(path: Path) -> int | None:
    """The model's output size from its config.json (Qwen3-VL keeps it in text_config), if stated."""
    try:
        data = json.loads(read_setting_file(path / "config.json", CONFIG_MAX_BYTES))
        size = (data.get("text_config") or {}).get("hidden_size", data.get("hidden_size"))
    except (OSError, SettingFileError, ValueError, RecursionError, AttributeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None
