"""Typed, strict configuration: dataclasses filled from YAML recipes and `key=value` overrides.

Every config is a dataclass whose fields carry a `help` text. Unknown keys are errors that name
the key and the nearest valid one; values are checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the method's configuration."""


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text (shown by `alignkit <command> --help`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Value checks for a config's __post_init__: each raises a ValueError that names the (dotted) key.

def at_least(cfg: Any, minimum: float, *keys: str) -> None:
    """Each of `keys` is >= minimum (1 for counts, 0 where 0 means off)."""
    for key in keys:
        value = _value(cfg, key)
        if value < minimum:
            raise ValueError(f"{key} must be at least {minimum}, not {value}")


def positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = _value(cfg, key)
        if value <= 0:
            raise ValueError(f"{key} must be > 0, not {value}")


def in_range(cfg: Any, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """low <= value <= high, with either end excluded when open."""
    value = _value(cfg, key)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{key} must be in {interval}, not {value}")


def one_of(cfg: Any, key: str, *choices: Any) -> None:
    value = _value(cfg, key)
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, not {value!r}")


def non_empty(cfg: Any, *keys: str) -> None:
    for key in keys:
        if not _value(cfg, key):
            raise ValueError(f"{key} must not be empty")


# Names other tools (transformers, TRL) give some keys: an unknown key close to one suggests ours.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_seq_length": "max_length",
           "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
           "model_name_or_path": "path", "bf16": "precision", "fp16": "precision"}


def _nearest(key: str, valid: list[str]) -> str:
    aliases = {a: k for a, k in ALIASES.items() if k in valid}
    close = difflib.get_close_matches(key, [*valid, *aliases], n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{aliases.get(close[0], close[0])}'?"
    return f" (valid keys: {', '.join(sorted(valid))})"


def _coerce(value: Any, tp: Any, where: str, base: Any = None) -> Any:
    """Check (and gently convert) a YAML value to a field type; raise ConfigError if it does not fit.
    `base` is the field's default: a mapping given for a dataclass field overrides its keys only."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, base)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where, base if isinstance(base, tp) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls: type, data: dict, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, strictly. Keys the mapping leaves out keep the
    values of `base` when given (a nested default such as SFT's `train` with epochs=2), else
    the field defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {name: getattr(base, name) for name in fields} if base is not None else {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{_nearest(str(key), list(fields))}")
        default = kwargs[key] if base is not None else _default(fields[key])
        kwargs[key] = _coerce(value, hints[key], path, default)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key '{(where + '.') if where else ''}{missing[0]}'")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err
    return obj


def defaults(cls: type) -> Any:
    """An instance of `cls` holding its field defaults, without running its validation (a config
    may require a key that has no usable default; overrides fill it, then `build` validates)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        object.__setattr__(obj, f.name, value)
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(cls: type, recipe: str | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe (optional), apply `key=value` overrides (dotted keys), build `cls`."""
    data: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe '{recipe}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{recipe}: invalid YAML: {err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{recipe}: not UTF-8 text ({err.reason} at byte {err.start + 1})") from err
        except OSError as err:
            raise ConfigError(f"{recipe}: cannot read: {err.strerror or err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{recipe}: the recipe must be a mapping of keys to values")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return build(cls, data, base=defaults(cls))


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per key of a config instance: `name = default  help` (for --help output)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, name + "."))
        else:
            lines.append(f"  {name} = {value!r}  {f.metadata.get('help', '')}".rstrip())
    return lines
