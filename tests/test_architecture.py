"""The package's layers as docs/architecture.md draws them: every module listed with its job,
no import cycle between sweeper's modules, counting imports made inside functions, and the
commands that only read a study file and its storage never import PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "sweeper"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sweeper modules ``path`` imports anywhere in its body (a package means its __init__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, modules) - {name} for name, path in paths.items()}
    # A package's __init__ re-exporting its private modules is one unit with them.
    for name in list(graph):
        if "._" in name:
            package = name.rsplit("._", 1)[0]
            graph[package] |= graph.pop(name) - {package}
            for targets in graph.values():
                if name in targets:
                    targets.discard(name)
                    targets.add(package)
    graph = {name: {t for t in targets if t != name} for name, targets in graph.items()}
    # `sweeper` itself (__init__: the version and the public names) and __main__ sit on top.
    return {name: targets - {"sweeper"} for name, targets in graph.items()}


def test_no_import_cycles_between_modules_even_inside_functions() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_is_listed_in_the_architecture_page_with_its_job() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name.startswith("_") and path.name not in ("__main__.py",):
            continue  # a package's private modules are listed with their package
        if path.name == "__init__.py":
            continue
        if f"`{relative}`" not in text:
            missing.append(relative)
    assert missing == [], f"docs/architecture.md does not list {missing}"


def test_reading_and_checking_a_study_imports_neither_pytorch_nor_transformers() -> None:
    """`validate`, `status`, `report` and the dashboard load the study file, check it and read
    the storage: PyTorch's import alone took 2.7 s of their 3 s here (model_specs.py)."""
    probe = (
        "import sys\n"
        "from sweeper import cli, dashboard, lineage, report, status, study\n"
        "for name in ('quickstart', 'bert_sst2', 'resnet_cifar10'):\n"
        "    study.load(f'studies/{name}.py', [])\n"
        "study.load('studies/quickstart.py', ['array_size=4'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
