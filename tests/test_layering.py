"""The package's shape: imports flow one way down the stages of the PEAR workflow, with no cycle, and every stage has
its tests folder. An AST walk finds every import (function-level ones too) of every module of ``pear_lightning/``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pear_lightning

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pear_lightning"
GROUND = {"errors", "atomic", "sampling"}
# stage -> the stages it may import (besides itself and the ground floor); see the package's docstring
ALLOWED = {
    "ground": set(),
    "data": set(),
    "model": {"data"},
    "training": {"model", "data", "strategies"},
    "behavior": {"model", "data"},
    "demo": {"training", "behavior", "model", "data"},
    "cli": {"demo", "training", "behavior", "model", "data", "strategies"},
    "strategies": set(),
}


PUBLIC = {f"pear_lightning.{name}": module for name, module in pear_lightning.PUBLIC.items()}
PUBLIC["pear_lightning.__version__"] = "version"  # a constant of the top level, which imports nothing


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    """The stage of a ``pear_lightning`` module: its subpackage, ``ground`` for the top-level modules."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__init__", "__main__"}:
        return "top"
    return "ground" if parts[1] in GROUND else parts[1]


def imports(path: Path) -> set[str]:
    """The ``pear_lightning`` modules a file imports: ``from pkg import name`` counts as the submodule ``pkg.name`` if
    there is one, else as ``pkg``; a public name of the package's top level counts as the module that defines it."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else PUBLIC.get(name, node.module))
    return {name for name in found if name in modules or name.startswith("pear_lightning.strategies")}


def graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports."""
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """The imports that run against the layering: ``a -> b`` where b's stage is not one a's stage may use."""
    bad = []
    for source, targets in edges.items():
        here = stage(source)
        for target in sorted(targets):
            there = "strategies" if target.startswith("pear_lightning.strategies") else stage(target)
            ok = here == "top" or there in {here, "ground"} or there in ALLOWED.get(here, set())
            if not ok:
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between modules, each as the path that closes it."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_flow_down_the_stages():
    assert violations(graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_layering_check_fails_on_an_import_against_the_pipeline():
    edges = graph()
    edges["pear_lightning.data.collate"] = edges["pear_lightning.data.collate"] | {"pear_lightning.training.distill"}
    edges["pear_lightning.behavior.score"] = edges["pear_lightning.behavior.score"] | {"pear_lightning.cli.preflight"}
    assert violations(edges) == [
        "pear_lightning.behavior.score -> pear_lightning.cli.preflight",
        "pear_lightning.data.collate -> pear_lightning.training.distill",
    ]
    edges["pear_lightning.data.cache"] = edges["pear_lightning.data.cache"] | {"pear_lightning.data.datamodule"}
    assert ["pear_lightning.data.cache", "pear_lightning.data.datamodule", "pear_lightning.data.cache"] in cycles(edges)


def test_strategies_import_only_torch_and_the_standard_library():
    allowed = {"torch", "__future__", "abc", "dataclasses", "math", "typing", "collections"}
    for path in (REPO / "strategies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, f"{path.name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), f"{path.name}: import"


def test_the_package_top_level_holds_the_ground_floor_and_one_folder_per_stage():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert modules == GROUND and len(modules) <= 6
    assert stages == {"data", "model", "training", "behavior", "cli", "demo"}
    for name in stages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "\n\n" not in doc, f"{name}/__init__.py: one docstring paragraph"


def test_every_stage_has_its_tests_folder():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {"strategies"}
    assert all((REPO / "tests" / name).is_dir() for name in stages), sorted(stages)


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("pear_lightning.data.datamodule", "pear_lightning.training"),
        ("pear_lightning.data.datamodule", "pear_lightning.model"),
        ("pear_lightning.model.logprobs", "pear_lightning.training"),
        ("pear_lightning.behavior.score", "pear_lightning.training"),
        ("pear_lightning.training.module", "pear_lightning.behavior"),
    ],
)
def test_importing_a_stage_does_not_load_a_stage_above_or_beside_it(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('{absent}')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"
