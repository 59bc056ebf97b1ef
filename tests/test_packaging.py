"""What `pip install .` puts in the wheel: every package the daemon imports, and the dashboard's
files (a plain install once left memory/ out, and the engines import it)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("api", "daemon", "engines", "memory", "policies")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_lessord_imports_is_in_the_wheel():
    listed = set(_setuptools()["packages"])
    wanted = {"lessor"} | {f"lessor.{p.parent.name}" for p in ROOT.glob("*/__init__.py") if p.parent.name in SHIPPED}
    assert wanted == {"lessor"} | {f"lessor.{name}" for name in SHIPPED}, "a shipped folder lost its __init__.py"
    assert wanted <= listed, f"missing from [tool.setuptools] packages: {sorted(wanted - listed)}"


def test_the_dashboards_files_are_package_data():
    patterns = _setuptools()["package-data"]["lessor.api"]
    files = sorted(p.relative_to(ROOT / "api") for p in (ROOT / "api" / "static").iterdir())
    assert files and all(any(f.match(pattern) for pattern in patterns) for f in files), (files, patterns)
