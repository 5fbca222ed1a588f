"""Typed overrides: a YAML document or dotted ``key=value`` strings applied to a config, each value
checked against its field's type; an unknown key stops with one line naming the closest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from transrec.config.model import RENAMED_CHOICES
from transrec.config.schema import Config
from transrec.errors import ConfigError


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_in(tp):
    """The dataclass type of ``tp`` or of ``Optional[tp]``, else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` checked (and, where lossless, converted) against type ``tp``; ConfigError if not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is Literal:
        on_off = {"on", "off"} <= set(args) and not any(isinstance(a, bool) for a in args)
        if on_off and isinstance(value, bool):
            return "on" if value else "off"  # YAML reads on/off/true/false as booleans
        if value in args:
            return value
        renamed = RENAMED_CHOICES.get(key, {}).get(value)
        if renamed in args:
            return renamed
        raise bad
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:  # an exact type match first (2 stays an int in ``str | int``)
            if isinstance(a, type) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, dict | list):
            raise bad
        return str(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is True or value == {}:  # "model.text.lora=true": the section with its defaults
            return tp()
        if isinstance(value, dict):
            obj = tp()
            apply_dict(obj, value, prefix=key + ".")
            return obj
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def valid_keys(obj, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) dataclass instance or type."""
    cls = obj if isinstance(obj, type) else type(obj)
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        sub = getattr(obj, name, None) if not isinstance(obj, type) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys.extend(valid_keys(sub, prefix + name + "."))
        elif _dataclass_in(tp) is not None:
            keys.extend(valid_keys(_dataclass_in(tp), prefix + name + "."))
    return keys


def _unknown(key: str, root) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(root), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def set_key(cfg, key: str, value: Any, *, root=None) -> None:
    """Set a dotted ``key`` of ``cfg`` to ``value`` (checked against the field's type)."""
    root = cfg if root is None else root
    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _hints(type(obj)):
            raise _unknown(key, root)
        tp = _hints(type(obj))[part]
        current = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                apply_dict(current, value, prefix=".".join(parts) + ".", root=root)
            else:
                setattr(obj, part, coerce(value, tp, key))
            return
        if current is None and _dataclass_in(tp) is not None:  # an optional section switched on
            current = _dataclass_in(tp)()
            setattr(obj, part, current)
        obj = current


def apply_dict(cfg, values: dict, prefix: str = "", root=None) -> None:
    """Apply a nested mapping (a YAML document) to ``cfg``."""
    root = cfg if root is None else root
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    for k, v in values.items():
        full = prefix + str(k)
        obj = cfg
        if not dataclasses.is_dataclass(obj) or str(k) not in _hints(type(obj)):
            raise _unknown(full, root)
        current = getattr(obj, str(k))
        tp = _hints(type(obj))[str(k)]
        if current is None and isinstance(v, dict) and _dataclass_in(tp) is not None:
            current = _dataclass_in(tp)()
            setattr(obj, str(k), current)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            apply_dict(current, v, prefix=full + ".", root=root)
        else:
            setattr(obj, str(k), coerce(v, _hints(type(obj))[str(k)], full))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as YAML (so 1e-3, true, [5, 10])."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-3" as a string; float fields accept it through coerce().
    return key, value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, values)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    return values
