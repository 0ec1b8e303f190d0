"""Configuration: config/default.toml, then an optional file, then the environment.

``AMI__HEADEND__SESSION_MAX_FRAMES=100`` overrides ``[headend] session_max_frames``;
values are parsed as TOML literals when they can be (numbers, booleans), else
kept as strings.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = REPO_ROOT / "config" / "default.toml"
ENV_PREFIX = "AMI__"


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


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if DEFAULT_FILE.exists():
        config = tomllib.loads(DEFAULT_FILE.read_text())
    if path:
        config = _merge(config, tomllib.loads(Path(path).read_text()))
    env = os.environ if env is None else env
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            continue
        section, key = parts
        config.setdefault(section, {})[key] = _parse_env_value(raw)
    return config


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(config.get(name, {}))
