"""bench/, deploy/ and scripts/ import privfed's names inside functions too (a benchmark loads
torch only when it runs). Neither ruff nor mypy reads those scripts' lazy imports against the
package, so a renamed or removed name broke a benchmark only when someone ran it: every
``from privfed... import name`` there must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _privfed_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("privfed")
        for alias in node.names
    ]


def _resolves(module: str, name: str) -> bool:
    if hasattr(importlib.import_module(module), name):
        return True
    try:  # a submodule: from privfed.privacy import pld
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def test_every_privfed_name_the_scripts_import_exists():
    scripts = [p for d in ("bench", "deploy", "scripts") for p in sorted((ROOT / d).glob("*.py"))]
    imports = [(p, m, n) for p in scripts for m, n in _privfed_imports(p)]
    assert len(imports) > 20  # the scripts do import privfed: the check reads something
    missing = [f"{p.relative_to(ROOT)}: {m}.{n}" for p, m, n in imports if not _resolves(m, n)]
    assert not missing, missing


def test_a_name_that_does_not_exist_is_caught():
    assert not _resolves("privfed.privacy.service.requests", "event_of")
    assert _resolves("privfed.privacy", "pld") and _resolves("privfed.config", "one_line")
