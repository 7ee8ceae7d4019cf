"""The documentation site: every public name has a docstring, every public module is rendered
by the API reference, and the site builds with ``mkdocs build --strict``.

The reference (docs/reference/*.md, ``::: module`` directives) is generated from the docstrings
by static analysis, so a public name without a docstring is missing from it: the first test
names each such name and where it is defined.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
REFERENCE = ROOT / "docs" / "reference"

# The modules whose ``__all__`` (and the public methods and properties of the public classes in
# it) must be documented.
DOCUMENTED_MODULES = (
    "thenable",
    "thenable.futures",
    "thenable.rpc",
    "thenable.rpc.functions",
    "thenable.rpc.api",
    "thenable.rpc.constants",
    "thenable.autograd",
    "thenable.optim",
    "thenable.nn",
    "thenable.cli",
)
NEEDS_TORCH = frozenset({"thenable.autograd", "thenable.optim", "thenable.nn"})

# Public names known to have no docstring, by where they are defined, with the file to fix.
# Each fix must remove its entry: test_known_missing_docstrings_are_still_missing fails until
# it does.  Empty this as they are fixed.
KNOWN_MISSING: dict[str, str] = {}

_DIRECTIVE = re.compile(r"^:::\s+([A-Za-z_][\w.]*)\s*$", re.MULTILINE)


def _module_file(module_name: str) -> Path:
    base = SRC.joinpath(*module_name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _attribute_docstring(module_name: str, name: str) -> tuple[str, str | None]:
    """Where module attribute ``name`` is assigned (following ``from X import name as name``)
    and the string literal after the assignment, if any: its docstring, as the reference
    reads it.  A value has no ``__doc__`` of its own, so this reads the source."""
    tree = ast.parse(_module_file(module_name).read_text(encoding="utf-8"))
    for index, node in enumerate(tree.body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _attribute_docstring(node.module, alias.name)
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            following = tree.body[index + 1] if index + 1 < len(tree.body) else None
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                return f"{module_name}.{name}", following.value.value
            return f"{module_name}.{name}", None
    raise AssertionError(f"{module_name}.{name} is in __all__ but assigned nowhere in its source")


def _canonical(obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _own_doc(obj: object) -> str | None:
    """The object's own docstring (``inspect.getdoc`` would inherit a base class's)."""
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _members(cls: type) -> Iterator[tuple[str, object]]:
    """The public methods and properties that ``cls`` itself defines."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            yield name, value.__func__
        elif isinstance(value, property) or inspect.isfunction(value):
            yield name, value


def _documented_items(module_name: str) -> dict[str, tuple[str, str | None]]:
    """``{canonical name: (the name as the module exports it, docstring)}`` for the module's
    ``__all__`` and the public methods and properties of the classes in it."""
    module = importlib.import_module(module_name)
    items: dict[str, tuple[str, str | None]] = {}
    for name in module.__all__:
        obj = getattr(module, name)
        shown = f"{module_name}.{name}"
        if isinstance(obj, types.ModuleType | type) or callable(obj):
            items.setdefault(_canonical(obj), (shown, _own_doc(obj)))
        else:
            where, doc = _attribute_docstring(module_name, name)
            items.setdefault(where, (shown, doc))
        if isinstance(obj, type):
            for member_name, member in _members(obj):
                canonical = f"{_canonical(obj)}.{member_name}"
                items.setdefault(canonical, (f"{shown}.{member_name}", _own_doc(member)))
    return items


def _import_or_skip(module_name: str) -> None:
    if module_name in NEEDS_TORCH:
        pytest.importorskip(
            "torch", reason=f"{module_name} needs torch (pip install -e '.[torch]')"
        )


@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    _import_or_skip(module_name)
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"module {module_name} has no docstring"
    missing = [
        f"{shown} (defined as {canonical})"
        for canonical, (shown, doc) in _documented_items(module_name).items()
        if not (doc or "").strip() and canonical not in KNOWN_MISSING
    ]
    assert not missing, "public names without a docstring (the reference leaves them out):\n" + (
        "\n".join(missing)
    )


def test_known_missing_docstrings_are_still_missing() -> None:
    found: dict[str, str | None] = {}
    for module_name in DOCUMENTED_MODULES:
        if module_name in NEEDS_TORCH:
            continue  # no known-missing name is defined there
        found.update((c, doc) for c, (_, doc) in _documented_items(module_name).items())
    for canonical, where in KNOWN_MISSING.items():
        assert canonical in found, (
            f"{canonical} ({where}) is no longer public: remove it from KNOWN_MISSING"
        )
        assert not (found[canonical] or "").strip(), (
            f"{canonical} has a docstring now: remove it from KNOWN_MISSING in tests/test_docs.py"
        )


def _public_modules() -> list[str]:
    """Every module under src/thenable with no ``_`` at the start of any part of its name,
    found in the file tree (nothing imported)."""
    names = []
    for path in sorted((SRC / "thenable").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


def test_the_public_modules_are_the_documented_ones() -> None:
    assert sorted(_public_modules()) == sorted(DOCUMENTED_MODULES)


def test_every_public_module_is_rendered_by_the_reference() -> None:
    rendered = {
        name
        for page in REFERENCE.glob("*.md")
        for name in _DIRECTIVE.findall(page.read_text(encoding="utf-8"))
    }
    missing = [name for name in _public_modules() if name not in rendered]
    assert not missing, f"no '::: module' directive in docs/reference/*.md for: {missing}"


def test_the_site_builds_with_no_warning(tmp_path: Path) -> None:
    pytest.importorskip(
        "mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]' brings it)"
    )
    site = tmp_path / "site"
    # Material for MkDocs prints a banner about its successor on every build; it is not a
    # warning of the build, and this variable is its own switch for it.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert "WARNING" not in output, output
    assert (site / "index.html").is_file()
    assert (site / "reference" / "rpc" / "index.html").is_file()
