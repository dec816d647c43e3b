"""The package boundaries: the maths and the model code know nothing of the UI, and the UI does no
tensor work of its own (it goes through what `attention/` and `generation/` expose)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("attention", "generation")
# What the UI must reach only through generation/ and attention/: the model stack and tensor code.
UI_FORBIDDEN = ("torch", "transformers", "bitsandbytes", "accelerate", "numpy")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports; relative ones are local)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_import_no_gradio(package):
    offenders = {p.name for p in sources(package) if "gradio" in imported_modules(p) or "ui" in imported_modules(p)}
    assert not offenders, f"{package}/ must not import gradio or ui/: {sorted(offenders)}"


@pytest.mark.parametrize("path", sources("ui"), ids=lambda p: p.name)
def test_ui_modules_use_the_libraries_not_the_model_stack(path):
    used = imported_modules(path)
    assert not used & set(UI_FORBIDDEN), f"ui/{path.name} imports {sorted(used & set(UI_FORBIDDEN))}"


def test_ui_is_the_only_package_that_imports_gradio():
    importers = {p.relative_to(REPO).parts[0] for p in REPO.glob("*/**/*.py") if "gradio" in imported_modules(p)}
    assert importers <= {"ui", "tests", "bench"}, importers


def test_importing_the_libraries_loads_no_gradio():
    code = "import sys, attention, generation, generation.inside, generation.backends, generation.decode\n" \
           "assert 'gradio' not in sys.modules, 'gradio was imported'\nprint('clean')\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-2000:]


def test_the_scanner_sees_imports():
    # The checks above are only as good as imported_modules: it must see both import forms.
    assert {"gradio", "attention"} <= imported_modules(REPO / "ui" / "lab.py")  # import x / from x import y
    assert {"torch", "transformers"} <= imported_modules(REPO / "generation" / "decode" / "cache.py")


def test_app_py_only_assembles():
    text = (REPO / "app.py").read_text()
    assert len(text.splitlines()) < 150
    # No tensor maths or model internals: torch is imported only to set its thread count.
    assert not imported_modules(REPO / "app.py") & {"transformers", "attention", "bitsandbytes", "numpy"}
