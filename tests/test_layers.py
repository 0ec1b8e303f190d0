"""The tree reads as its architecture: imports only go down the layers.

Walks every module of the project (not the tests) and fails on

* an import that goes the wrong way (a service importing another service or
  a tool, the core importing anything of ours, ...);
* an import cycle between modules (function-level imports included: a lazy
  import hides a cycle, it does not remove it);
* a private name (``_x``) taken from another package, or a private module
  (``pkg._x``) imported from outside its package.

The layers, lowest first, as ami/__init__.py states them.  A unit may import
itself and the units listed for it; ``ami.cli`` reaches the services and
tools only by module name (importlib), never by an import statement.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("ami", "headend", "meters", "concentrator", "bench")
FIRST_PARTY = ("ami", "headend", "meters", "concentrator")

SERVICES = ("headend", "meters", "concentrator")
ALLOWED: dict[str, set[str]] = {
    "ami.protocol": set(),
    "ami.machines": {"ami.protocol"},
    "ami.security": {"ami.protocol"},
    "ami.runtime": {"ami.protocol", "ami.security"},
    "ami.broker": {"ami.protocol", "ami.security", "ami.runtime"},
    **{s: {"ami.protocol", "ami.machines", "ami.security", "ami.runtime"} for s in SERVICES},
    "ami.tools": {"ami.protocol", "ami.machines", "ami.security", "ami.runtime", "ami.broker", *SERVICES},
    "ami.cli": {"ami.runtime"},
    "ami": set(),
    # Benchmarks are users of the package: anything but the CLI dispatcher.
    "bench": {"ami.protocol", "ami.machines", "ami.security", "ami.runtime", "ami.broker", "ami.tools", *SERVICES},
}


def unit_of(module: str) -> str:
    """The layer a module belongs to: ``ami.<pkg>`` inside ami, else its top package."""
    parts = module.split(".")
    if parts[0] == "ami":
        return ".".join(parts[:2]) if len(parts) > 1 else "ami"
    return parts[0]


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    module: str  # the module imported (absolute)
    names: tuple[str, ...]  # names taken from it (from ... import ...)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def project_files() -> list[Path]:
    files = []
    for root in ROOTS:
        files += [p for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def collect_imports() -> list[Import]:
    found = []
    for path in project_files():
        me = module_name(path)
        package = me if is_package(path) else me.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(me, path, node.lineno, alias.name, ()))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.append(Import(me, path, node.lineno, target, tuple(a.name for a in node.names)))
    return [i for i in found if i.module.split(".")[0] in FIRST_PARTY]


def known_modules() -> set[str]:
    return {module_name(p) for p in project_files()}


def resolve(imp: Import, modules: set[str]) -> list[str]:
    """The project modules an import loads: the module, and any submodules named in ``from X import sub``."""
    targets = [imp.module] if imp.module in modules else []
    for name in imp.names:
        if f"{imp.module}.{name}" in modules:
            targets.append(f"{imp.module}.{name}")
    return targets


def describe(imp: Import) -> str:
    return f"{imp.path.relative_to(REPO)}:{imp.line} imports {imp.module}"


def test_the_walk_sees_the_whole_tree():
    modules = known_modules()
    for expected in ("ami.protocol.frames", "ami.machines.meter", "ami.machines.headend", "ami.runtime.bus",
                     "ami.security.vault", "ami.broker.server", "ami.tools.loadtest.run", "headend.service",
                     "meters.fleet", "concentrator.relay"):
        assert expected in modules
    assert len(collect_imports()) > 100
    assert all(unit_of(m) in ALLOWED for m in modules), sorted(unit_of(m) for m in modules if unit_of(m) not in ALLOWED)


def test_imports_only_go_down_the_layers():
    wrong = []
    for imp in collect_imports():
        mine, theirs = unit_of(imp.importer), unit_of(imp.module)
        if mine == theirs or theirs in ALLOWED[mine]:
            continue
        wrong.append(f"{describe(imp)} ({mine} may not import {theirs})")
    assert wrong == []


def test_services_never_import_each_other_or_the_tools():
    # Implied by the table above; stated on its own because it is the rule people break first.
    for service in SERVICES:
        others = {*SERVICES} - {service} | {"ami.tools", "ami.cli", "ami.broker"}
        assert not others & ALLOWED[service]
    bad = [describe(i) for i in collect_imports()
           if unit_of(i.importer) in SERVICES and unit_of(i.module) not in ALLOWED[unit_of(i.importer)] | {unit_of(i.importer)}]
    assert bad == []


def test_no_import_cycles():
    modules = known_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in collect_imports():
        for target in resolve(imp, modules):
            # A package's __init__ importing its own submodules is how packages
            # re-export; a submodule importing its package's __init__ is the cycle.
            if target != imp.importer:
                graph[imp.importer].add(target)
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(modules):
        if node not in state:
            visit(node)
    assert cycles == []


def _package_of(module: str, modules: set[str]) -> str:
    """The package a module sits in (its own name for a package)."""
    if module in modules and (REPO / Path(*module.split(".")) / "__init__.py").exists():
        return module
    return module.rpartition(".")[0]


def test_no_private_name_crosses_a_package():
    modules = known_modules()
    bad = []
    aliases: dict[tuple[str, str], str] = {}
    for imp in collect_imports():
        mine = _package_of(imp.importer, modules)
        theirs = _package_of(imp.module, modules) if imp.module in modules else imp.module.rpartition(".")[0]
        # a private module (pkg._x) used from outside pkg
        for part_index, part in enumerate(imp.module.split(".")):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(imp.module.split(".")[:part_index])
                if not (mine == owner or mine.startswith(owner + ".")):
                    bad.append(f"{describe(imp)}: private module")
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__") and f"{imp.module}.{name}" not in modules:
                if not (mine == theirs or mine.startswith(theirs + ".") or mine == imp.module
                        or mine.startswith(imp.module + ".")):
                    bad.append(f"{describe(imp)}: takes private name {name}")
        if not imp.names:
            aliases[(imp.importer, imp.module.split(".")[-1])] = imp.module
    # module._private attribute use on a module imported from another package
    for path in project_files():
        me = module_name(path)
        mine = _package_of(me, modules)
        tree = ast.parse(path.read_text(), filename=str(path))
        imported_modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        imported_modules[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                owner = _package_of(imported_modules[node.value.id], modules)
                if not (mine == owner or mine.startswith(owner + ".")):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert bad == []


def test_the_layer_checks_catch_what_they_claim(tmp_path: Path):
    """The rules above are not vacuous: each fires on a planted violation."""
    planted = [
        Import("headend.service", REPO / "headend/service.py", 1, "meters.fleet", ("Fleet",)),
        Import("ami.protocol.frames", REPO / "ami/protocol/frames.py", 1, "ami.runtime.bus", ("make_client",)),
        Import("meters.fleet", REPO / "meters/fleet.py", 1, "ami.tools.provision", ("provision",)),
    ]
    for imp in planted:
        assert unit_of(imp.module) not in ALLOWED[unit_of(imp.importer)]
    assert unit_of("ami.tools.attack.store") == "ami.tools"
    assert unit_of("headend") == "headend"
