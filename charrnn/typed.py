"""Typed dataclasses from untyped values (YAML, JSON, `key=value` strings): the one place where
a plain dict becomes a config, and where the field checks in `__post_init__` get their wording.

`from_dict` rejects unknown keys and wrong types and turns a failed `__post_init__` check into a
`ConfigError`; `want` words a check as `<section.field> must be <rule>, got <value>`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

from charrnn.errors import ConfigError


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)  # `from_dict` turns it into a ConfigError


def want(obj: Any, dotted: str, ok: bool, what: str) -> None:
    """Fail with `<dotted> must be <what>, got <value>`: one field per message, its value shown."""
    if not ok:
        raise ValueError(f"{dotted} must be {what}, got {getattr(obj, dotted.rsplit('.', 1)[1])!r}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, d: Any, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        key = f"{prefix}{unknown[0]!s}"
        near = did_you_mean(key, [prefix + n for n in names])  # a typo: the one key meant
        raise ConfigError(f"unknown config key {key}" + (near or (
            f"; valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")))
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every field of a nested dataclass as a dotted key: `model.hidden_size`, ..."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        keys += (dotted_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                 else [f"{prefix}{f.name}"])
    return keys


def did_you_mean(key: str, keys: list[str]) -> str:
    """`; did you mean 'model.hidden_size'?` for `hidden_size` or `model.hiden_size`, else ""."""
    near = ([k for k in keys if k.rsplit(".", 1)[-1] == key]  # the section left out
            or difflib.get_close_matches(key, keys, n=1, cutoff=0.8))  # a typo
    return f"; did you mean {near[0]!r}?" if len(near) == 1 else ""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently, so a second `train:` section would drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, whose keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own check words it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), refusing duplicate keys."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text quotes the source)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what
