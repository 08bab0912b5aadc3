"""Every package the code imports is declared in pyproject.toml, and the constraints pin what is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN = {"preprocess", "pretrain", "finetune"}
# Imported only inside a backend the user chooses, with an error that says how to install it.
OPTIONAL = {"detectron2": "docs/detector.md: built from source for the detectron2 backend"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(directory: Path) -> set[str]:
    modules = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - OWN - {"__future__"}


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for group in project["optional-dependencies"].values() for r in group}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for package in ("preprocess", "pretrain", "finetune"):
        for module in _imports(REPO / package) - set(OPTIONAL):
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & core:
                undeclared[module] = (package, sorted(names))
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    # Tests may use the extras too, and each other's modules (tests/*.py, on the path as pytest runs them).
    local = {"tests"} | {path.stem for path in (REPO / "tests").glob("*.py")}
    for module in _imports(REPO / "tests") - set(OPTIONAL) - local:
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & (core | extras), f"tests import {module} ({names}), which pyproject.toml does not declare"


def test_constraints_pin_every_declared_package_but_the_torch_pair():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for group in project["optional-dependencies"].values() for r in group}
    pinned = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.lower().replace("_", "-")] = version
    assert declared - {"torch", "torchvision"} <= set(pinned), sorted(declared - set(pinned))
    assert not {"torch", "torchvision"} & set(pinned)  # the Makefile's TORCH_PIN chooses the pair
    # The environment the suite runs in is the pinned one.
    for name in declared - {"torch", "torchvision"}:
        assert importlib.metadata.version(name) == pinned[name], name
