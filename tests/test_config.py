"""Configuration: one set of defaults (the packaged TOML), precedence
file < environment, provenance, the TOML emitter, and no code default that
drifts from the TOML."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest

from ami.cli import COMMANDS, build_parser
from ami.machines.headend import Policy
from ami.machines.meter import MeterConfig
from ami.runtime.config import (
    DEFAULT_FILE,
    dump_toml,
    load_config,
    load_config_with_sources,
    packaged_defaults,
    section,
)
from concentrator.relay import RelaySettings
from meters.fleet import FleetSettings

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = packaged_defaults()


# --- where the defaults live ------------------------------------------------------------


def test_defaults_are_package_data_and_config_dir_links_to_them():
    assert DEFAULT_FILE.parent == REPO / "ami" / "runtime"
    assert tomllib.loads(DEFAULT_FILE.read_text()) == DEFAULTS
    link = REPO / "config" / "default.toml"
    assert link.is_symlink() and link.resolve() == DEFAULT_FILE.resolve()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "default.toml" in pyproject["tool"]["setuptools"]["package-data"]["ami.runtime"]
    assert DEFAULTS["headend"]["session_max_age_s"] == 120


def test_defaults_do_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, sources = load_config_with_sources(env={})
    assert config == DEFAULTS
    assert {s["source"] for s in sources.values()} == {"default"}
    assert set(sources) == {f"{sec}.{key}" for sec, table in DEFAULTS.items() for key in table}


# --- precedence and provenance ------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_file_then_env_override_the_defaults(tmp_path):
    f = _write(tmp_path / "mine.toml", "[headend]\nsession_max_age_s = 30\nextra = 'x'\n[newsec]\nk = true\n")
    env = {"AMI__HEADEND__SESSION_MAX_AGE_S": "5", "AMI__BUS__BROKER": "mqtt://h:1", "OTHER": "1",
           "AMI__TOO__MANY__PARTS": "1"}
    config, sources = load_config_with_sources(f, env, cwd=tmp_path)
    h = config["headend"]
    assert h["session_max_age_s"] == 5 and h["extra"] == "x"
    assert h["session_max_frames"] == DEFAULTS["headend"]["session_max_frames"]
    assert config["bus"]["broker"] == "mqtt://h:1" and config["newsec"] == {"k": True}
    assert "too" not in config
    assert sources["headend.session_max_age_s"] == {"source": "env", "name": "AMI__HEADEND__SESSION_MAX_AGE_S"}
    assert sources["bus.broker"] == {"source": "env", "name": "AMI__BUS__BROKER"}
    assert sources["headend.extra"] == {"source": "file", "path": str(f)}
    assert sources["newsec.k"] == {"source": "file", "path": str(f)}
    assert sources["headend.session_max_frames"] == {"source": "default"}
    assert load_config(f, env, cwd=tmp_path) == config


def test_env_values_are_toml_literals_else_strings():
    env = {"AMI__HEADEND__SESSION_MAX_FRAMES": "100", "AMI__HEADEND__ASSOCIATION_TIMEOUT_S": "2.5",
           "AMI__X__FLAG": "true", "AMI__HEADEND__STORE": "sqlite:other.db", "AMI__X__QUOTED": '"1"'}
    config = load_config(env=env, cwd="/nonexistent")
    assert config["headend"]["session_max_frames"] == 100
    assert config["headend"]["association_timeout_s"] == 2.5
    assert config["x"] == {"flag": True, "quoted": "1"}
    assert config["headend"]["store"] == "sqlite:other.db"


def test_which_file(tmp_path):
    local = _write(tmp_path / "config" / "local.toml", "[headend]\nsession_max_age_s = 1\n")
    named = _write(tmp_path / "named.toml", "[headend]\nsession_max_age_s = 2\n")
    explicit = _write(tmp_path / "explicit.toml", "[headend]\nsession_max_age_s = 3\n")

    def age_and_source(path=None, env=None):
        config, sources = load_config_with_sources(path, env or {}, cwd=tmp_path)
        return config["headend"]["session_max_age_s"], sources["headend.session_max_age_s"]

    assert age_and_source() == (1, {"source": "file", "path": str(local)})  # config/local.toml in cwd
    assert age_and_source(env={"AMI_CONFIG": str(named)}) == (2, {"source": "file", "path": str(named)})
    assert age_and_source(explicit, {"AMI_CONFIG": str(named)}) == (3, {"source": "file", "path": str(explicit)})
    # The environment still wins over the file.
    assert age_and_source(explicit, {"AMI__HEADEND__SESSION_MAX_AGE_S": "4"})[0] == 4
    local.unlink()
    assert age_and_source() == (120, {"source": "default"})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml", {}, cwd=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_config(None, {"AMI_CONFIG": str(tmp_path / "missing.toml")}, cwd=tmp_path)


def test_section_copies():
    config = load_config(env={}, cwd="/nonexistent")
    s = section(config, "headend")
    s["store"] = "changed"
    assert config["headend"]["store"] != "changed"
    assert section(config, "nope") == {}


# --- TOML out -------------------------------------------------------------------------------


def test_dump_toml_round_trips():
    config = {
        "top": 1,
        "a": {"s": 'quote " back \\ tab \t nl \n del \x7f ctl \x01 é', "i": -3, "f": 0.5, "big": 1e300,
              "b": False, "neg": -0.0, "arr": [1, 2], "inline": {"k": "v"}, "odd key": 1},
        "weird.section": {"x": 1.0},
        "empty": {},
    }
    text = dump_toml(config, {"a.i": "env AMI__A__I", "top": "line\nbreak"})
    assert tomllib.loads(text) == config
    assert "i = -3  # env AMI__A__I" in text.splitlines()
    assert tomllib.loads(dump_toml(DEFAULTS)) == DEFAULTS


def _ami_config(capsys, *argv):
    from ami.cli import main

    assert main([*argv]) == 0
    return capsys.readouterr().out


def test_ami_config_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("AMI__") or n == "AMI_CONFIG"]:
        monkeypatch.delenv(name)
    f = _write(tmp_path / "f.toml", "[headend]\ncounter_block = 64\n")
    monkeypatch.setenv("AMI__HEADEND__SESSION_MAX_AGE_S", "7")
    out = json.loads(_ami_config(capsys, "--config", str(f), "config", "--json"))
    # The dispatcher hands the file to the processes a command starts through
    # the command's arguments, never by changing its own environment (which
    # every later subprocess of a test run would inherit).
    assert "AMI_CONFIG" not in os.environ
    assert out["config"]["headend"]["session_max_age_s"] == 7
    assert out["config"]["headend"]["counter_block"] == 64
    assert out["config"]["bus"] == DEFAULTS["bus"]
    assert out["sources"]["headend.session_max_age_s"] == {"source": "env", "name": "AMI__HEADEND__SESSION_MAX_AGE_S"}
    assert out["sources"]["headend.counter_block"] == {"source": "file", "path": str(f)}
    assert out["sources"]["bus.broker"] == {"source": "default"}

    text = _ami_config(capsys, "--config", str(f), "config")
    assert tomllib.loads(text) == out["config"]
    lines = text.splitlines()
    assert "session_max_age_s = 7  # env AMI__HEADEND__SESSION_MAX_AGE_S" in lines
    assert f"counter_block = 64  # file {f}" in lines
    assert 'broker = "mqtt://127.0.0.1:1884"  # default' in lines


# --- code defaults never drift from the TOML ------------------------------------------------


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize(
    ("cls", "sections"),
    [
        (Policy, {"headend": None}),
        (MeterConfig, {"meters": None}),
        (FleetSettings, {"meters": None, "bus": ["qos"], "monitor": ["metrics_interval_s"]}),
        (RelaySettings, {"concentrator": None, "bus": ["qos"], "monitor": ["metrics_interval_s"]}),
    ],
)
def test_dataclass_defaults_equal_the_packaged_toml(cls, sections):
    defaults = _field_defaults(cls)
    compared = 0
    for sec, keys in sections.items():
        for key, value in DEFAULTS[sec].items():
            if key in defaults and (keys is None or key in keys):
                assert defaults[key] == value and type(defaults[key]) in (type(value), float), (
                    f"{cls.__name__}.{key} = {defaults[key]!r} but [{sec}] {key} = {value!r} in {DEFAULT_FILE}")
                compared += 1
    assert compared >= 3


def test_from_config_without_a_config_equals_the_packaged_defaults():
    assert Policy.from_config({}) == Policy.from_config(DEFAULTS["headend"])
    assert RelaySettings.from_config({}) == RelaySettings.from_config(DEFAULTS)
    assert FleetSettings.from_config({}) == FleetSettings.from_config(DEFAULTS)


def _argument_defaults(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_argument_defaults(sub, f"{prefix}{name} "))
        elif action.dest != "help":
            out[prefix + action.dest] = action.default
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_line_defaults_equal_the_packaged_toml(command):
    """A subcommand's option defaults are the same whether it is given the
    packaged configuration or none at all: no fallback of its own differs."""
    with_defaults = _argument_defaults(build_parser(DEFAULTS, command))
    without = _argument_defaults(build_parser({}, command))
    assert with_defaults == without


# Every ``<section mapping>.get("key", fallback)`` in the services: the fallback must be the TOML value.
SOURCE_DIRS = ("ami", "headend", "meters", "concentrator")


def _section_of(node: ast.AST) -> str | None:
    """``X.get("section", ...)`` (possibly inside ``dict(...)``) -> section."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and node.args:
        return _section_of(node.args[0])
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in DEFAULTS
            and isinstance(DEFAULTS[node.args[0].value], dict)):
        return node.args[0].value
    return None


def _fallbacks(tree: ast.AST):
    """(section, key, fallback literal, line) for each config .get with a literal fallback."""
    # Names are tracked per function; ``self.x`` across the whole module.
    attrs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and (sec := _section_of(node.value)):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    attrs[ast.unparse(target)] = sec
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    seen: set[int] = set()
    for scope in scopes:
        names = dict(attrs)
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and (sec := _section_of(node.value)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        names[target.id] = sec
        for node in ast.walk(scope):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)):
                continue
            receiver = node.func.value
            sec = _section_of(receiver) or names.get(ast.unparse(receiver))
            if sec is None or id(node) in seen:
                continue
            try:
                fallback = ast.literal_eval(node.args[1])
            except ValueError:
                continue
            seen.add(id(node))
            yield sec, node.args[0].value, fallback, node.lineno


def test_config_get_fallbacks_equal_the_packaged_toml():
    found, wrong = 0, []
    for top in SOURCE_DIRS:
        for path in sorted((REPO / top).rglob("*.py")):
            for sec, key, fallback, line in _fallbacks(ast.parse(path.read_text())):
                if key not in DEFAULTS[sec]:
                    continue
                found += 1
                if fallback != DEFAULTS[sec][key]:
                    wrong.append(f"{path.relative_to(REPO)}:{line}: [{sec}] {key} fallback {fallback!r}, "
                                 f"TOML {DEFAULTS[sec][key]!r}")
    assert not wrong, "\n".join(wrong)
    assert found >= 15, found  # the scan still sees the services' fallbacks


def test_the_fallback_scan_catches_a_drift():
    src = ("def f(config):\n    h = dict(config.get('headend', {}))\n    return h.get('session_max_age_s', 3600)\n"
           "class S:\n    def __init__(self, config):\n        self.b = config.get('bus', {})\n"
           "    def g(self):\n        return self.b.get('qos', 2), self.config.get('monitor', {}).get('x', 1)\n")
    got = {(s, k, v) for s, k, v, _ in _fallbacks(ast.parse(src))}
    assert got == {("headend", "session_max_age_s", 3600), ("bus", "qos", 2), ("monitor", "x", 1)}
