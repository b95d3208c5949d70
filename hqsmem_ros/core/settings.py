"""Settings as small dataclasses: the one owner of what a setting means and which values it takes.

A model (and PipelineConfig) declares its settings as dataclass fields made with `setting()`:
default, description, and the constraints where they exist (choices, a numeric range, or a
rule checked by a function). From that one declaration come:
- validation: `parse_settings(Settings, params, who)` turns a params dict (a config entry, a
  node's parameters) into a typed Settings instance or raises ConfigError naming who, the key,
  the value and what is allowed; an unknown key is named with the known ones;
- the node's parameter descriptors (ros/parameters.py: description, ranges, choices);
- the parameter tables of docs/ros.md (tools/param_docs.py).

Types come from the field annotations: bool, int, float, str, Optional[...] (None allowed) and
fixed-length tuples (a list is accepted: YAML and ROS give lists).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple



class ConfigError(ValueError):
    """An invalid configuration value; the message names the key. (Defined here, below
    core/config.py, which re-exports it, so that both can use it.)"""


def setting(default: Any, description: str, *, choices: Sequence[Any] = (), minimum: Optional[float] = None,
            maximum: Optional[float] = None, exclusive_minimum: bool = False,
            check: Optional[Callable[[Any], bool]] = None, rule: str = "") -> Any:
    """A dataclass field with its meaning and constraints. `check`/`rule`: a constraint no range
    says (e.g. powers of two); `rule` is how messages and docs phrase it."""
    meta = {"description": description, "choices": tuple(choices), "minimum": minimum, "maximum": maximum,
            "exclusive_minimum": exclusive_minimum, "check": check, "rule": rule}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """One setting as the node and the docs see it."""
    name: str
    default: Any
    description: str
    base: type            # bool, int, float, str, tuple or dict
    optional: bool        # None allowed
    item: Optional[type]  # element type of a tuple
    length: Optional[int]  # tuple length
    choices: Tuple[Any, ...]
    minimum: Optional[float]
    maximum: Optional[float]
    exclusive_minimum: bool
    rule: str
    check: Optional[Callable[[Any], bool]] = None

    @property
    def has_range(self) -> bool:
        return self.minimum is not None or self.maximum is not None

    def allowed(self) -> str:
        """What the setting takes, as messages and docs say it ('a number in [0, 1]')."""
        if self.rule:
            text = self.rule
        elif self.choices:
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        else:
            kind = self.item if self.base is tuple else self.base
            text = _KIND_TEXT.get(kind, kind.__name__)
            if self.base is tuple:
                text = f"{self.length} {_PLURAL.get(kind, kind.__name__)}"
            text += self.range_text()
        if self.optional:
            text = "true, false or null" if text == "true or false" else text + " or null"
        return text

    def range_text(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f" in [{_num(lo)}, {_num(hi)}]" if not self.exclusive_minimum else f" in ({_num(lo)}, {_num(hi)}]"
        if lo is not None:
            return f" {'>' if self.exclusive_minimum else '>='} {_num(lo)}"
        if hi is not None:
            return f" <= {_num(hi)}"
        return ""


_KIND_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else str(v)


def _show(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def settings_info(cls: type) -> Iterator[SettingInfo]:
    """The settings of a Settings dataclass, in declaration order, with their resolved types."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Union and type(None) in args:
            optional = True
            tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
        item = length = None
        if origin is tuple:
            item, length = args[0], len(args)
        elif origin is dict:
            origin = dict
        m = f.metadata
        if "description" not in m:
            raise TypeError(f"{cls.__qualname__}.{f.name} is not declared with setting()")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield SettingInfo(f.name, default, m["description"], origin, optional, item, length, m["choices"],
                          m["minimum"], m["maximum"], m["exclusive_minimum"], m["rule"], m["check"])


def check_value(info: SettingInfo, value: Any, who: str = "") -> Any:
    """The value converted to the setting's type (int -> float, list -> tuple), or ConfigError
    '<who>: <key> must be <allowed>, got <value>'."""
    if value is None and info.optional:
        return None
    if info.base is tuple:
        ok = isinstance(value, (list, tuple)) and len(value) == info.length
        items = [_convert(info.item, v) for v in value] if ok else []
        if not ok or any(v is _BAD or not _in_range(info, v) for v in items):
            raise _error(info, value, who)
        out: Any = tuple(items)
    else:
        out = _convert(info.base, value)
        if out is _BAD or not _in_range(info, out) or (info.choices and out not in info.choices):
            raise _error(info, value, who)
    if info.check is not None and not info.check(out):
        raise _error(info, value, who)
    return out


_BAD = object()


def _convert(kind: type, v: Any) -> Any:
    if kind is bool:
        return v if isinstance(v, bool) else _BAD
    if isinstance(v, bool):
        return _BAD
    if kind is int:
        return v if isinstance(v, int) else _BAD
    if kind is float:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else _BAD
    return v if isinstance(v, kind) else _BAD


def _in_range(info: SettingInfo, v: Any) -> bool:
    if info.minimum is not None and (v <= info.minimum if info.exclusive_minimum else v < info.minimum):
        return False
    return info.maximum is None or v <= info.maximum


def _error(info: SettingInfo, value: Any, who: str) -> ConfigError:
    return ConfigError(f"{who + ': ' if who else ''}{info.name} must be {info.allowed()}, got {value!r}")


def unknown_keys_message(who: str, unknown: Sequence[str], known: Sequence[str]) -> str:
    hints = [(k, difflib.get_close_matches(k, list(known), n=1, cutoff=0.6)) for k in unknown]
    hint = "".join(f"; did you mean {h[0]!r} for {k!r}?" for k, h in hints if h)
    names = ", ".join(repr(k) for k in unknown)
    return (f"{who}: unknown parameter{'s' if len(unknown) > 1 else ''} {names}{hint} "
            f"(known: {', '.join(known)})")


def parse_settings(cls: type, params: Optional[Mapping[str, Any]], who: str):
    """A Settings instance from a params dict: the one validation path of a model's settings.
    `cls.REFUSED` (optional, key -> why) names keys that look plausible but are not taken."""
    params = dict(params or {})
    for key, why in getattr(cls, "REFUSED", {}).items():
        if key in params:
            raise ConfigError(f"{who}: parameter {key!r} is not used: {why}")
    infos = {i.name: i for i in settings_info(cls)}
    unknown = sorted(set(params) - set(infos))
    if unknown:
        raise ConfigError(unknown_keys_message(who, unknown, list(infos)))
    values: Dict[str, Any] = {}
    for name, info in infos.items():
        if name in params:
            values[name] = check_value(info, params[name], who)
    return cls(**values)
