"""docs/architecture.md lists every module of every package the project ships, one line each."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch

from tests.infra import ROOT

DOC = (ROOT / "docs" / "architecture.md").read_text()


def shipped_modules() -> set[str]:
    """Every module setuptools ships: top-level py-modules, and each .py of each package whose
    name matches the include list (a package's __init__.py is named as the package, `pkg/`)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    modules = {f"{name}.py" for name in setuptools.get("py-modules", [])}
    for top in ROOT.iterdir():
        if not (top / "__init__.py").is_file() or not any(fnmatch(top.name, p) for p in include):
            continue
        for path in top.rglob("*.py"):
            relative = path.relative_to(ROOT)
            if path.name == "__init__.py":
                modules.add(f"{relative.parent.as_posix()}/")
            else:
                modules.add(relative.as_posix())
    return modules


def documented_modules() -> set[str]:
    """The module (or package) each list item of the Modules section names first."""
    section = DOC.split("## Modules\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `([\w/]+(?:\.py|/))`:", section, flags=re.MULTILINE))


def test_every_shipped_module_has_a_line() -> None:
    missing = shipped_modules() - documented_modules()
    assert not missing, f"add a line to docs/architecture.md for: {sorted(missing)}"


def test_every_line_names_a_module_that_exists() -> None:
    gone = sorted(name for name in documented_modules() if not (ROOT / name).exists())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_the_check_covers_every_top_level_package() -> None:
    packages = {name.split("/")[0] for name in shipped_modules() if "/" in name}
    assert {"tasks", "workers", "core", "monitoring"} <= packages
    assert "tests" not in packages and "benchmarks" not in packages
