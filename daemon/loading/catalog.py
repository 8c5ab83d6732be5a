"""The models a daemon serves, by name: how the command line names them, and which one a request gets.

An operator lists models as `PATH_OR_HUB_ID` or `NAME=PATH_OR_HUB_ID`; the first of each kind is the
default. A request names one with `model` (its name, or the path or hub id it was configured with),
or asks for a fingerprint with `expect_fingerprint` and no `model`; every model's card is known at
start, before any weight is loaded, so either way the answer does not depend on what is loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Iterable

from daemon.config import ModelSettings, default_model_name
from qwen3vl_client.errors import ErrorCode, RequestError, model_mismatch

TASKS = ("embedding", "reranker")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
FOREVER = ("forever", "inf", "never", "-1")
DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION_S = 10 * 365 * 86400.0  # ten years: anything longer is `forever`, said as such
FINGERPRINT_LIKE = re.compile(r"[0-9a-f]{20}")  # what a fingerprint looks like (fingerprint.py: FINGERPRINT_HEX)
# --model-setting NAME.KEY=VALUE: the per-model settings, and the ModelSettings field each sets.
SETTING_KEYS = {"dtype": "dtype", "quantize": "quantize", "max-length": "max_length",
                "keep-alive": "keep_alive_s", "attn-implementation": "attn_implementation"}


class CatalogError(ValueError):
    """A model list or per-model setting that cannot work; the message names the value."""


def parse_duration(text: str) -> float | None:
    """Seconds from `30s`, `10m`, `2h`, `1d`, `500ms`, a plain number of seconds or `0`; None for `forever`."""
    value = text.strip().lower()
    if value in FOREVER:
        return None
    found = re.fullmatch(r"(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m|h|d|)", value, re.ASCII)
    if not found:
        raise CatalogError(f"{text!r} is not a duration: use 30s, 10m, 2h, 0 (unload once idle) or forever")
    seconds = float(found.group(1)) * DURATION_UNITS[found.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise CatalogError(f"{text!r} is longer than ten years: say forever")
    return seconds


def split_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=SOURCE` as (NAME, SOURCE); a plain source (whatever '=' it holds after a '/') as (None, source)."""
    head, sep, tail = spec.partition("=")
    if sep and "/" not in head and head.strip():
        name = head.strip()
        if not NAME.fullmatch(name):
            raise CatalogError(f"{spec!r}: the model name {name!r} must be {NAME_RULE}")
        if not tail.strip():
            raise CatalogError(f"{spec!r}: give a directory or hub id after '='")
        return name, tail.strip()
    return None, spec.strip()


def apply_settings(models: list[ModelSettings], settings: Iterable[str]) -> list[ModelSettings]:
    """`models` with each `NAME.KEY=VALUE` applied to the models of that name (--model-setting; an
    embedding model and a reranker may share a name, then both take it)."""
    by_name: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        by_name.setdefault(m.served_name, []).append(i)
    models = list(models)
    for text in settings:
        target, sep, value = text.partition("=")
        name, dot, key = target.strip().rpartition(".")
        if not (sep and dot and name):
            raise CatalogError(f"--model-setting {text!r}: expected NAME.KEY=VALUE, e.g. big.quantize=int8")
        if name not in by_name:
            raise CatalogError(f"--model-setting {text!r}: no model is named {name!r} (models: "
                               f"{', '.join(by_name)})")
        if key not in SETTING_KEYS:
            raise CatalogError(f"--model-setting {text!r}: unknown setting {key!r} (settings: "
                               f"{', '.join(SETTING_KEYS)})")
        for index in by_name[name]:
            models[index] = replace(models[index], **{SETTING_KEYS[key]: _setting_value(key, value.strip(), text)})
    return models


def _setting_value(key: str, value: str, text: str):
    if key == "keep-alive":
        return parse_duration(value)
    if key == "max-length":
        if not value.isdigit() or int(value) < 16:
            raise CatalogError(f"--model-setting {text!r}: max-length is a number of tokens, at least 16")
        return int(value)
    return value


def check_names(models: list[tuple[str, ModelSettings]]) -> None:
    """Every model's name is unique among its kind's (a request's `model` names one of its op's kind)."""
    seen: dict[tuple[str, str], str] = {}
    sources = {(kind, settings.name) for kind, settings in models}
    for kind, settings in models:
        name = settings.served_name
        if not NAME.fullmatch(name):
            raise CatalogError(f"the {kind} model {settings.name!r} would be named {name!r}, which is not {NAME_RULE}: "
                               f"name it, e.g. --{kind}-model small={settings.name}")
        if FINGERPRINT_LIKE.fullmatch(name):
            raise CatalogError(f"the {kind} model {settings.name!r} would be named {name!r}, which reads as a "
                               f"fingerprint (the bridge routes those by fingerprint): name it otherwise")
        if (kind, name) in sources and name != settings.name:
            raise CatalogError(f"the {kind} model name {name!r} is also the path of another {kind} model: a request "
                               "naming it would be ambiguous; name them apart")
        if (kind, name) in seen:
            raise CatalogError(f"two {kind} models are named {name!r} ({seen[kind, name]} and {settings.name}): name "
                               f"them apart, e.g. --{kind}-model other={settings.name}")
        seen[kind, name] = settings.name


@dataclass(frozen=True)
class ModelCard:
    """What is known of a model without loading it: from its settings and its files."""

    name: str  # what requests call it
    task: str  # embedding | reranker
    source: str  # the directory or hub id it was configured with (replies' `model`)
    default: bool
    fingerprint: str | None  # of its files and weight format (fingerprint.py)
    max_length: int
    hidden_size: int | None = None  # embedding: the full output dimension
    keep_alive_s: float | None = None  # None: never unloaded for idleness
    estimate_bytes: int | None = None  # weights, as estimated from the files' headers (fit.py)
    working_bytes: int = 0  # one batch's working memory, as estimated
    device: str = "cpu"  # where it runs once loaded
    key: str = ""  # the engine's name for it: `task:name` unless given (names are unique per task)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", f"{self.task}:{self.name}")

    def describe(self) -> str:
        return f"{self.task} model {self.name!r}"


def resolve(cards: Iterable[ModelCard], task: str, model: str | None, fingerprint: str | None) -> ModelCard:
    """The card a request gets: by `model` (a name, else a configured source, else the last part of
    exactly one model's source), else by the expected fingerprint, else the default; RequestError
    unknown_model, model_mismatch or not_loaded (none of this kind is served)."""
    mine = [c for c in cards if c.task == task]
    if not mine:
        raise RequestError(ErrorCode.NOT_LOADED, f"the {task} model is disabled on this daemon")
    if model is not None:
        card = next((c for c in mine if c.name == model), None) or next((c for c in mine if c.source == model), None)
        if card is None:  # the source's last part: what a renamed model was called before it was named
            by_tail = [c for c in mine if default_model_name(c.source) == model]
            card = by_tail[0] if len(by_tail) == 1 else None
        if card is None:
            raise unknown_model(task, model, mine)
        if fingerprint is not None and fingerprint != card.fingerprint:
            raise model_mismatch(task, fingerprint, card.fingerprint)
        return card
    default = next(c for c in mine if c.default)
    if fingerprint is None or fingerprint == default.fingerprint:
        return default
    card = next((c for c in mine if c.fingerprint == fingerprint), None)
    if card is None:
        if len(mine) == 1:
            raise model_mismatch(task, fingerprint, default.fingerprint)
        served = ", ".join(f"{c.name!r} {c.fingerprint}" for c in mine)
        raise RequestError(ErrorCode.MODEL_MISMATCH, f"expect_fingerprint: no {task} model here has fingerprint "
                                                     f"{fingerprint}; this daemon serves {served} (the default: "
                                                     f"{default.name!r})",
                           {"expected": fingerprint, "actual": default.fingerprint})
    return card


def unknown_model(task: str, model: str, served: list[ModelCard]) -> RequestError:
    """`unknown_model`, naming the request's `model` and every model of the task (with its source)."""
    listed = ", ".join(f"{c.name!r} ({c.source})" for c in served)
    return RequestError(ErrorCode.UNKNOWN_MODEL, f"model: no {task} model is named {model[:80]!r} here; this daemon "
                                                 f"serves {listed}", {"model": model[:200],
                                                                       "served": [c.name for c in served]})

