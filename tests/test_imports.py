"""Import cost and layering: `functional` and the package itself load without Lightning; monitors stand alone."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import lightning_viz

_PACKAGE = pathlib.Path(lightning_viz.__file__).parent
_NO_LIGHTNING = "import sys; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
_FUNCTIONAL = sorted(
    f"lightning_viz.functional.{p.stem}" for p in (_PACKAGE / "functional").glob("*.py") if p.stem != "__init__"
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["lightning_viz", "lightning_viz.functional", *_FUNCTIONAL])
def test_module_imports_without_lightning(module):
    done = _run(f"import {module}; {_NO_LIGHTNING}")
    assert done.returncode == 0, done.stderr


def test_callbacks_still_import_from_the_package():
    done = _run(
        "from lightning_viz import FilterMonitor, default_suite; import lightning_viz as lv; "
        "assert len(default_suite()) == 9; assert isinstance(default_suite()[0], FilterMonitor); "
        "assert set(lv.__all__) <= set(dir(lv)); [getattr(lv, n) for n in lv.__all__]"
    )
    assert done.returncode == 0, done.stderr


def test_functional_all_names_resolve():
    done = _run(
        "import lightning_viz.functional as F; assert set(F.__all__) <= set(dir(F)); "
        f"[getattr(F, n) for n in F.__all__]; {_NO_LIGHTNING}"
    )
    assert done.returncode == 0, done.stderr


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchMonitor"):
        lightning_viz.NoSuchMonitor  # noqa: B018


def test_no_callback_module_imports_another_monitor():
    callbacks = _PACKAGE / "callbacks"
    monitors = {p.stem for p in callbacks.glob("*_monitor.py")}
    for path in callbacks.glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        others = {m for m in monitors - {path.stem} if f"lightning_viz.callbacks.{m}" in imported}
        assert not others, f"{path.name} imports {sorted(others)}"
