"""What `pip install .` puts in the wheel: every package the daemon imports, and the dashboard's
files (a plain install once left memory/ out, and the engines import it)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

from ..support.paths import ROOT
from ..support.waiting import HANG_S

SHIPPED = ("api", "daemon", "engines", "memory", "policies")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_lessord_imports_is_in_the_wheel():
    listed = set(_setuptools()["packages"])
    found = {p.parent.relative_to(ROOT) for name in SHIPPED for p in (ROOT / name).rglob("__init__.py")}
    wanted = {"lessor"} | {"lessor." + ".".join(folder.parts) for folder in found}
    assert {f"lessor.{name}" for name in SHIPPED} <= wanted, "a shipped folder lost its __init__.py"
    assert wanted <= listed, f"missing from [tool.setuptools] packages: {sorted(wanted - listed)}"


def test_the_dashboards_files_are_package_data():
    assert "lessor.api.static" in _setuptools()["packages"]
    patterns = _setuptools()["package-data"]["lessor.api.static"]
    files = sorted(p.relative_to(ROOT / "api" / "static") for p in (ROOT / "api" / "static").iterdir())
    assert files and all(any(f.match(pattern) for pattern in patterns) for f in files), (files, patterns)


def test_building_lessor_prints_no_setuptools_warning(tmp_path):
    """`make demo` once printed 40 lines of setuptools' warning that lessor.api.static was not a listed
    package; built here from a copy of the tree (the build writes build/ and egg-info beside it)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "var", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=HANG_S)
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "Warning" not in output and "lessor.api.static" not in output, output
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("lessor-*.whl"))) as wheel:
        shipped = {Path(name).name for name in wheel.namelist() if name.startswith("lessor/api/static/")}
    assert shipped == {p.name for p in (ROOT / "api" / "static").iterdir()}
