"""The one check of ``Literal`` choice fields over nested config dataclasses (torch-free)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from transrec.errors import ConfigError


def check_choices(obj, prefix: str) -> None:
    """ConfigError naming the first field of ``obj`` (recursively) whose value is not one of its
    ``Literal`` choices. Overrides are checked as they are set; this catches a config built in
    Python."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        key = f"{prefix}.{f.name}"
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_choices(value, key)
