"""Imports run one way (docs/architecture): io, sam -> peft, decoders -> models -> data -> train, evaluate, infer ->
cli, serve, export. Read statically from every module, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imedsam"

#: each package and the packages it may import (besides itself and the base modules errors, runtime)
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "sam": set(),
    "peft": {"sam", "io"},
    "decoders": {"sam"},
    "models": {"sam", "peft", "decoders", "io"},
    "data": {"io", "sam", "models"},
    "train": {"io", "sam", "peft", "decoders", "models", "data"},
    "evaluate": {"io", "sam", "peft", "decoders", "models", "data"},
    "infer": {"io", "sam", "peft", "decoders", "models", "data"},
}
BASE = {"errors", "runtime", "__init__"}
TOP = {"cli", "cli_train", "cli_volume", "cli_common", "cli_serve", "cli_export", "__main__", "info", "demo", "serve",
       "export"}  # may import everything


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imedsam"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # `from imedsam import io` names a module; `__version__` is the package's own
                found.update(a.name for a in node.names if (PACKAGE / a.name).exists()
                             or (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("imedsam."):
                    found.add(alias.name.split(".")[1])
    return found


def test_imports_run_one_way():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if owner in TOP or owner in BASE:
            continue
        assert owner in ALLOWED, f"{rel}: package {owner!r} has no place in the layering; add it to ALLOWED"
        for target in _imports(path) - BASE - {owner}:
            if target not in ALLOWED[owner]:
                bad.append(f"{rel} imports imedsam.{target}")
    assert not bad, "; ".join(bad)


def test_base_modules_import_no_package():
    for name in BASE - {"__init__"}:
        assert not (_imports(PACKAGE / f"{name}.py") - BASE - {name}), name
