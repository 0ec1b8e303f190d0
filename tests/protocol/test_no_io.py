"""The protocol core and the state machines are sans-I/O: no sockets, event
loop, files, clock or randomness of their own (ami.protocol, ami.machines)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ami.machines
import ami.protocol

PACKAGE = Path(ami.protocol.__file__).parent
MACHINES = Path(ami.machines.__file__).parent
FORBIDDEN_MODULES = {
    "asyncio", "socket", "sqlite3", "aiomqtt", "amqtt", "uvloop", "threading", "subprocess", "selectors",
}
# Our own source may not even touch these (the interpreter itself loads os
# and time at start-up, so sys.modules cannot tell).
FORBIDDEN_IN_SOURCE = FORBIDDEN_MODULES | {
    "time", "os", "random", "secrets", "io", "pathlib", "logging", "signal", "multiprocessing", "concurrent",
    "ssl", "http", "urllib", "shutil", "tempfile", "datetime", "uuid", "importlib",
}
ALLOWED_IMPORTS = {
    "__future__", "dataclasses", "enum", "hashlib", "hmac", "re", "struct", "typing", "cryptography", "msgpack",
}
# The state machines may also use these pure modules, and the core (ami.protocol)
# and each other (ami.machines), nothing else of ours.
MACHINES_ALLOWED_IMPORTS = ALLOWED_IMPORTS | {"array", "bisect", "collections", "operator", "heapq", "math", "ami"}  # pure data structures
MACHINES_ALLOWED_OURS = ("ami.protocol", "ami.machines")
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}


def _fresh_import(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent.parent
    )
    return json.loads(out.stdout)


def test_importing_the_core_loads_no_io_module():
    # The brief's exact probe: everything loaded after `import ami.protocol`.
    loaded = set(_fresh_import("import ami.protocol, sys, json; print(json.dumps(sorted(sys.modules)))"))
    assert "ami.protocol" in loaded
    # What the `ami` package itself loads belongs to other modules' owners:
    # judge only what importing the core adds on top of it.
    baseline = set(_fresh_import("import ami, sys, json; print(json.dumps(sorted(sys.modules)))"))
    added = loaded - baseline
    assert {m for m in added if m.split(".")[0] in FORBIDDEN_MODULES} == set()
    # ... nor do our dependencies (cryptography, msgpack) drag any in.
    deps = set(
        _fresh_import(
            "import sys, json; b = set(sys.modules); import msgpack;"
            " from cryptography.hazmat.primitives.ciphers.aead import AESGCM;"
            " from cryptography.hazmat.primitives import keywrap;"
            " print(json.dumps(sorted(set(sys.modules) - b)))"
        )
    )
    assert {m for m in deps if m.split(".")[0] in FORBIDDEN_MODULES} == set()


def test_importing_the_state_machines_loads_no_io_module():
    code = "import sys, json; b = set(sys.modules); import ami.machines.meter, ami.machines.headend; " \
           "print(json.dumps(sorted(set(sys.modules) - b)))"
    added = set(_fresh_import(code))
    assert "ami.machines.headend" in added
    assert {m for m in added if m.split(".")[0] in FORBIDDEN_MODULES} == set()


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must stay inside the package
                assert node.level == 1, f"import reaches outside its package: {ast.unparse(node)}"
                continue
            yield node, node.module or ""


def test_source_imports_nothing_but_the_allowed_modules():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {
        "__init__.py", "_ber.py", "association.py", "channel.py", "cipher.py", "counters.py",
        "errors.py", "frames.py", "keys.py", "messages.py", "topics.py",
    }
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, name in _imports(tree):
            top = name.split(".")[0]
            if path.name == "__init__.py" and name == "importlib":
                continue  # the lazy loader of our own submodules (PEP 562 __getattr__)
            assert top not in FORBIDDEN_IN_SOURCE, f"{path.name}:{node.lineno} imports {name}"
            assert top in ALLOWED_IMPORTS, f"{path.name}:{node.lineno} imports {name} (not on the allowlist)"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {node.func.id}()"


@pytest.mark.parametrize("path", sorted(MACHINES.glob("*.py")), ids=lambda p: p.name)
def test_state_machines_import_nothing_but_pure_modules_and_the_core(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, name in _imports(tree):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_IN_SOURCE, f"{path.name}:{node.lineno} imports {name}"
        assert top in MACHINES_ALLOWED_IMPORTS, f"{path.name}:{node.lineno} imports {name} (not on the allowlist)"
        if top == "ami":
            assert name.startswith(MACHINES_ALLOWED_OURS), f"{path.name}:{node.lineno} imports {name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {node.func.id}()"


def test_the_machines_allowlist_catches_io(tmp_path: Path):
    """The check above is not vacuous: a planted clock read is caught."""
    planted = tmp_path / "bad.py"
    planted.write_text("import time\nfrom ami.runtime.bus import make_client\n")
    names = [name for _node, name in _imports(ast.parse(planted.read_text()))]
    assert "time" in FORBIDDEN_IN_SOURCE and "time" in names
    assert not "ami.runtime.bus".startswith(MACHINES_ALLOWED_OURS)
