"""Strict TOML -> typed Config: unknown keys are errors, `--set a.b=v` overrides, docs from source."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from feixing.config import schema
from feixing.config.schema import Config

# TOML names that are Python keywords or clash with them map to field names here.
_ALIASES = {("checkpoint", "async"): "async_save"}


class ConfigError(ValueError):
    """A configuration a user wrote is invalid; the message names the key and the fix."""


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _field_names(cls) -> dict[str, str]:
    """TOML key -> dataclass field name for a section class."""
    section = {v: k for k, v in ((k[1], v) for k, v in _ALIASES.items())}
    return {section.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a field type, converting only the lossless cases."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp in (int, float):
        # ints widen to floats; floats never silently truncate to ints
        allowed = (int,) if tp is int else (int, float)
        if isinstance(value, allowed) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if isinstance(value, list):
            if dataclasses.is_dataclass(item):
                return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
            return [_coerce(v.strip() if isinstance(v, str) else v, item, where) for v in value]
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    names = _field_names(cls)
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        if key not in names:
            full = f"{where}.{key}".lstrip(".")
            raise ConfigError(f"unknown key '{full}'{_closest(key, list(names))}")
        fname = names[key]
        tp = hints[fname]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, f"{where}.{key}".lstrip("."))
        else:
            value = _coerce(value, tp, f"{where}.{key}".lstrip("."))
        setattr(obj, fname, value)
    return obj


def _parse_value(text: str) -> Any:
    """`--set` values: TOML literals where they parse (1, 2.5, true, [1,2], "s"), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `section.key=value` strings into a raw TOML dict (CLI beats file)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=20")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. optim.lr=1e-3")
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"--set {item!r}: '{parts[0]}' is not a section")
        data[parts[0]][parts[1]] = _parse_value(text.strip())
    return data


def load(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or defaults when path is None) and apply `--set` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return _build(Config, data, "")


def to_dict(cfg: Config) -> dict:
    """Config -> plain dict with TOML key names (the inverse of load)."""

    def conv(obj):
        if dataclasses.is_dataclass(obj):
            names = {v: k for k, v in _field_names(type(obj)).items()}
            return {names[f.name]: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Config, with_docs: bool = False) -> str:
    """Serialise a resolved config as TOML (optionally with each field's doc as a comment)."""
    docs = field_docs() if with_docs else {}
    out: list[str] = []
    for section, values in to_dict(cfg).items():
        if section == "faults":
            for fault in values:
                out += ["[[faults]]"] + [f"{k} = {_toml_value(v)}" for k, v in fault.items()] + [""]
            continue
        out.append(f"[{section}]")
        for key, value in values.items():
            if with_docs and (section, key) in docs:
                out.append(f"# {docs[(section, key)]}")
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def field_docs() -> dict[tuple[str, str], str]:
    """(section, toml key) -> the docstring written under that field in schema.py."""
    tree = ast.parse(inspect.getsource(schema))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs: dict[str, str] = {}
            body = node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)):
                    docs[a.target.id] = str(b.value.value)
            by_class[node.name] = docs
    out: dict[tuple[str, str], str] = {}
    for f in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[f.name]
        if typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
        for key, fname in _field_names(cls).items():
            if fname in by_class.get(cls.__name__, {}):
                out[(f.name, key)] = by_class[cls.__name__][fname]
    return out
