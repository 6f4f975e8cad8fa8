"""Layers only import downward (core, then augment/losses/data/configs, models, rundir and optim, evaluation, training
and deploy, tables; entrypoints on top), no two files import each other in a cycle, and every package is small."""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# What each package may import from this project (besides itself), bottom to top; entrypoints, bench/ and tests/ sit
# above them all.
LOW = {"core", "augment", "losses", "data", "configs", "models"}
ALLOWED = {
    "core": set(),
    "augment": {"core"},
    "losses": {"core"},
    "data": {"core"},
    "configs": {"core"},
    "models": {"core", "losses"},
    "rundir": LOW,
    "optim": LOW,
    "evaluation": LOW | {"rundir", "optim"},
    "training": LOW | {"rundir", "optim", "evaluation"},
    "deploy": LOW | {"rundir", "optim", "evaluation"},
    "tables": LOW | {"rundir"},
}
PROJECT = set(ALLOWED) | {"engine", "bench", "tests", "pretrain", "finetune", "reproduce", "export", "explain"}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports, wherever in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def violations(root: Path = REPO) -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for imported in sorted(project_imports(path) - allowed - {package}):
                bad.append(f"{path.relative_to(root)} imports {imported}")
    return bad


def test_packages_import_only_below_themselves():
    assert violations() == []


def test_every_package_is_small_says_its_job_and_engine_is_gone():
    """No catch-all room: at most 10 modules a package, each package's docstring one line; no engine/ left."""
    assert not (REPO / "engine").exists()
    for package in ALLOWED:
        modules = [p for p in (REPO / package).glob("*.py") if p.name != "__init__.py"]
        assert 0 < len(modules) <= 10, (package, len(modules))
        doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text())) or ""
        assert doc.split("\n")[0].endswith("."), f"{package}/__init__.py: no one-line summary of its job"
    sources = [*REPO.glob("*.py"), *(path for top in (*ALLOWED, "bench", "tests") for path in (REPO / top).rglob("*.py"))]
    importers = [str(path.relative_to(REPO)) for path in sources if "engine" in project_imports(path)]
    assert importers == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above would fail: a copy of the tree where data/ imports evaluation/ is caught, at module or function
    level."""
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "data" / "up.py").write_text("import torch\nfrom evaluation.knn import knn_top1\n")
    (tmp_path / "models" / "late.py").write_text("def f():\n    import tables.plan\n")
    (tmp_path / "models" / "fine.py").write_text("from losses import nt_xent\nfrom core import dist\n")
    (tmp_path / "evaluation" / "up.py").write_text("from training.pretraining import train_step\n")
    (tmp_path / "training" / "fine.py").write_text("from evaluation.knn import knn_top1\n")
    assert violations(tmp_path) == ["data/up.py imports evaluation", "models/late.py imports tables",
                                    "evaluation/up.py imports training"]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_on_their_own(package):
    """Importing a package loads nothing from the layers above it (a fresh interpreter)."""
    import subprocess
    import sys

    code = (f"import sys, {package}\n"
            "above = sorted(m for m in sys.modules\n"
            f"               if m.split('.')[0] in {sorted(PROJECT - ALLOWED[package] - {package})})\n"
            "print(above)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


PACKAGES = tuple(ALLOWED)


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for the project's packages and top-level entrypoints."""
    files = {p.stem: p for p in root.glob("*.py")}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in the file (``from pkg import name`` counts as importing
    pkg.name when that is a module, else pkg)."""
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                         for alias in node.names]
            edges |= {name for name in names if name in files and name != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between files, each once (as found by a depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_only_re_exports_another():
    """A module that holds nothing but imports (a shim left by a move) sends readers to the wrong file."""
    shims = []
    for module, path in module_files().items():
        body = [n for n in ast.parse(path.read_text()).body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # the docstring
        if path.name != "__init__.py" and body and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
            shims.append(module)
    assert shims == []
