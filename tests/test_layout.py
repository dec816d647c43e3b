"""The layout of generation/: one room per concern (the README's Layout), readable in one sitting,
no import cycle, no private name used across modules, and ui/ reaching generation only through
its packages' public names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 700


def package_sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    """generation/backends/engine.py -> generation.backends.engine (a package's __init__ -> the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (REPO / Path(*name.split(".")) / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names taken from it) for every import in `path`, function-level ones too."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from package import module` names a module, not a value
            subs = [n for n in names if (REPO / Path(*target.split("."), f"{n}.py")).is_file() or is_package(f"{target}.{n}")]
            found.append((target, [n for n in names if n not in subs]))
            found += [(f"{target}.{n}", []) for n in subs]
    return found


@pytest.mark.parametrize("path", package_sources("generation") + package_sources("ui") + package_sources("attention"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_room_reads_in_one_sitting(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (at most {MAX_LINES})"


def test_no_import_cycle_in_generation():
    modules = {module_name(p): p for p in package_sources("generation")}
    graph = {m: {t for t, _ in imports_of(p) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in [*package_sources("generation"), *package_sources("ui"), REPO / "app.py"]:
        for target, names in imports_of(path):
            if target.split(".")[0] in ("generation", "ui", "attention"):
                offenders += [f"{path.relative_to(REPO)}: {target}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_ui_reaches_generation_through_its_packages_only():
    offenders = []
    for path in [*package_sources("ui"), REPO / "app.py"]:
        for target, _ in imports_of(path):
            if target.split(".")[0] == "generation" and not is_package(target):
                offenders.append(f"{path.relative_to(REPO)}: {target}")
    assert not offenders, f"import these through generation or generation.<package>: {offenders}"


def test_the_scanner_resolves_relative_imports(tmp_path):
    # The checks above are only as good as imports_of: relative imports must resolve to real modules.
    engine = REPO / "generation" / "backends" / "engine.py"
    targets = {t for t, _ in imports_of(engine)}
    assert any(t.startswith("generation.decode") for t in targets), targets
    assert module_name(REPO / "generation" / "inside" / "__init__.py") == "generation.inside"


def test_no_merge_conflict_markers_are_left_in_the_tree():
    root = Path(__file__).resolve().parents[1]
    marked = [str(p.relative_to(root)) for p in root.rglob("*")
              if p.suffix in {".py", ".md", ".txt", ".c", ".ini", ".tsv"} and not any(part.startswith(".") or part in {"venv", "build"} for part in p.relative_to(root).parts)
              and p.is_file() and any(line.startswith(("<<<<<<< ", ">>>>>>> "))
                                      for line in p.read_text(encoding="utf-8", errors="replace").splitlines())]
    assert not marked, f"unresolved merge conflicts in {marked}"
