"""The installable package: build the wheel, install it in a fresh venv
outside the checkout, and run ``ami`` from another folder.

The venv gets the third-party dependencies from this checkout's venv through
a ``.pth`` naming a folder of links to its site-packages, minus the editable
install of ``ami-linky`` (its finder would import ``ami`` from the checkout),
so nothing is downloaded and ``ami`` itself comes from the wheel only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "ami", "headend", "meters", "concentrator")
DIST = "ami_linky"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources (setuptools writes build/ and egg-info
    next to them; the checkout is shared)."""
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp / "wheel"
    reasons = []
    for isolation in (["--no-build-isolation"], []):
        r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(src)],
                 timeout=300)
        wheels = sorted(out.glob(f"{DIST}-*.whl"))
        if r.returncode == 0 and wheels:
            return wheels[-1]
        reasons.append(f"pip wheel {' '.join(isolation)}: exit {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
    reason = "cannot build a wheel: " + " | ".join(reasons)
    print(reason)
    pytest.skip(reason)


def _dependencies_folder(tmp: Path) -> Path:
    """Links to everything in this venv's site-packages but the editable
    install of this project (and .pth files, which a .pth-added path does not
    run anyway)."""
    deps = tmp / "deps"
    deps.mkdir()
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(site).iterdir():
            name = entry.name
            if (name.startswith(("__editable__", DIST)) or name.endswith(".pth")
                    or name in ("ami", "headend", "meters", "concentrator") or (deps / name).exists()):
                continue
            (deps / name).symlink_to(entry)
    return deps


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    assert REPO not in tmp.resolve().parents
    wheel = _build_wheel(tmp)
    with zipfile.ZipFile(wheel) as z:
        assert "ami/runtime/default.toml" in z.namelist()
        assert not any(n.startswith(("tests/", "config/")) for n in z.namelist())
    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    assert r.returncode == 0, r.stderr
    python = venv / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
              "--no-compile", str(wheel)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "_ami_test_dependencies.pth").write_text(f"{_dependencies_folder(tmp)}\n")
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AMI__") and k not in ("AMI_CONFIG", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"venv": venv, "python": python, "ami": venv / "bin" / "ami", "cwd": work, "env": env, "tmp": tmp}


def test_ami_is_imported_from_the_wheel(installed):
    code = ("import ami, ami.runtime.config as c, headend, meters, concentrator; "
            "print(ami.__file__); print(c.__file__); print(c.DEFAULT_FILE)")
    r = _run([str(installed["python"]), "-c", code],
             cwd=installed["cwd"], env=installed["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    venv = installed["venv"].resolve()
    for line in r.stdout.split():
        path = Path(line).resolve()
        assert venv in path.parents and REPO not in path.parents, line


def test_ami_config_reports_the_packaged_defaults(installed):
    r = _run([str(installed["ami"]), "config", "--json"], cwd=installed["cwd"], env=installed["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["defaults_file"]).resolve().is_relative_to(installed["venv"].resolve())
    assert out["config"]["headend"]["session_max_age_s"] == 120
    assert out["sources"]["headend.session_max_age_s"] == {"source": "default"}
    assert {s["source"] for s in out["sources"].values()} == {"default"}

    env = {**installed["env"], "AMI__HEADEND__SESSION_MAX_AGE_S": "30"}
    r = _run([str(installed["ami"]), "config", "--json"], cwd=installed["cwd"], env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["headend"]["session_max_age_s"] == 30
    assert out["sources"]["headend.session_max_age_s"] == {"source": "env", "name": "AMI__HEADEND__SESSION_MAX_AGE_S"}

    local = installed["cwd"] / "config" / "local.toml"
    local.parent.mkdir(exist_ok=True)
    local.write_text("[headend]\nsession_max_frames = 99\n")
    try:
        r = _run([str(installed["ami"]), "config"], cwd=installed["cwd"], env=installed["env"], timeout=60)
    finally:
        local.unlink()
    assert r.returncode == 0, r.stderr
    assert f"session_max_frames = 99  # file {local}" in r.stdout.splitlines(), r.stdout


def test_a_tiny_loadtest_runs_from_the_installed_package(installed):
    report = installed["tmp"] / "report.json"
    r = _run([str(installed["ami"]), "loadtest", "--meters", "20", "--concentrators", "2", "--rate", "20",
              "--duration", "3", "--ramp-up", "1", "--quiet", "--workdir", str(installed["tmp"] / "runs"),
              "--report", str(report)], cwd=installed["cwd"], env=installed["env"], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    frames = json.loads(report.read_text())["frames"]
    assert frames["run"]["stored"] > 0, frames
    assert frames["rejected"] == 0 and frames["rejected_by_reason"] == {}, frames
