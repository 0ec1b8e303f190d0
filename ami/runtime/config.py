"""Configuration: the packaged defaults, then an optional file, then the environment.

1. ``ami/runtime/default.toml``, shipped inside the package: the one set of
   defaults (``config/default.toml`` in the repository links to it);
2. one optional file: ``--config FILE``, else ``$AMI_CONFIG``, else
   ``config/local.toml`` in the current folder if it exists;
3. environment variables: ``AMI__HEADEND__SESSION_MAX_FRAMES=100`` overrides
   ``[headend] session_max_frames``; values are parsed as TOML literals when
   they can be (numbers, booleans), else kept as strings.

``load_config_with_sources`` also tells where each ``section.key`` came from
(``ami config`` prints it).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).with_name("default.toml")
ENV_PREFIX = "AMI__"
#: Environment variable naming the optional configuration file.
CONFIG_ENV = "AMI_CONFIG"
#: Looked for in the current folder when neither --config nor $AMI_CONFIG is given.
LOCAL_FILE = Path("config") / "local.toml"

#: ``"section.key"`` (or ``"key"`` for a top-level value) -> where it came from:
#: ``{"source": "default"}``, ``{"source": "file", "path": ...}`` or ``{"source": "env", "name": ...}``.
Sources = dict[str, dict[str, str]]


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _mark(sources: Sources, data: Mapping[str, Any], origin: dict[str, str]) -> None:
    for name, value in data.items():
        if isinstance(value, Mapping):
            for key in value:
                sources[f"{name}.{key}"] = dict(origin)
        else:
            sources[name] = dict(origin)


def packaged_defaults() -> dict[str, Any]:
    """The defaults shipped inside the package, nothing else."""
    return tomllib.loads(resources.files(__package__).joinpath("default.toml").read_text(encoding="utf-8"))


def config_file(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> Path | None:
    """The optional file: ``path``, else ``$AMI_CONFIG``, else ``config/local.toml`` under ``cwd`` if it exists."""
    env = os.environ if env is None else env
    if path:
        return Path(path)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    local = Path.cwd() / LOCAL_FILE if cwd is None else Path(cwd) / LOCAL_FILE
    return local if local.is_file() else None


def load_config_with_sources(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, *, cwd: str | Path | None = None
) -> tuple[dict[str, Any], Sources]:
    """The effective configuration and, for each value, where it came from."""
    env = os.environ if env is None else env
    config = packaged_defaults()
    sources: Sources = {}
    _mark(sources, config, {"source": "default"})
    file = config_file(path, env, cwd)
    if file is not None:
        extra = tomllib.loads(file.read_text(encoding="utf-8"))  # an explicit file that is missing is an error
        config = _merge(config, extra)
        _mark(sources, extra, {"source": "file", "path": str(file)})
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            continue
        sec, key = parts
        if not isinstance(config.get(sec, {}), dict):
            continue
        config.setdefault(sec, {})[key] = _parse_env_value(raw)
        sources[f"{sec}.{key}"] = {"source": "env", "name": name}
    return config, sources


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, *, cwd: str | Path | None = None
) -> dict[str, Any]:
    return load_config_with_sources(path, env, cwd=cwd)[0]


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(config.get(name, {}))


# --- TOML out (``ami config``) ------------------------------------------------------

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else _toml_string(key)


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """A TOML literal for a str, int, float or bool (arrays and inline tables of them too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dump_toml(config: Mapping[str, Any], comments: Mapping[str, str] | None = None) -> str:
    """Our layout, ``[section]`` tables of ``key = value``, as TOML text; ``comments``
    maps ``"section.key"`` (or ``"key"``) to a trailing comment."""
    comments = comments or {}

    def line(key: str, value: Any, name: str) -> str:
        text = f"{_toml_key(key)} = {toml_value(value)}"
        note = comments.get(name)
        return f"{text}  # {' '.join(note.splitlines())}" if note else text

    lines = [line(k, v, k) for k, v in config.items() if not isinstance(v, Mapping)]
    for sec, table in config.items():
        if not isinstance(table, Mapping):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(sec)}]")
        lines.extend(line(k, v, f"{sec}.{k}") for k, v in table.items())
    return "\n".join(lines) + "\n"
