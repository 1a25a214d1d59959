"""The package's import graph, read from the source (lazy imports inside functions included):
every import points down the layers below (written once, here), so no module imports itself
back through others; and the server side does not load the training client (Opacus, the models)
to read a config or name a client."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import privfed

ROOT = Path(privfed.__file__).resolve().parent

# Top to bottom: a module may import from its own layer and the layers below it. A module
# belongs to the longest prefix that names it; every prefix is a package or a top-level module:
# no module has a layer of its own. The audit plugs in from above: its canaries reach DP-SGD,
# the federation's data and the user-level aggregation through the protocols those define
# (SuppliedGradients, ExtraRecords, UpdateAudit), never by importing it.
LAYERS: list[tuple[str, ...]] = [
    ("privfed.cli", "privfed.edge", "privfed.edge_gate", "privfed.app_cli"),
    (
        "privfed.simulation",
        "privfed.simulation_delivery",
        "privfed.simulation_bundling",
        "privfed.deployment",
        "privfed.app_bundle",
    ),
    ("privfed.server",),
    ("privfed.client",),
    ("privfed.audit",),
    ("privfed.strategies",),
    ("privfed.privacy",),
    ("privfed.data",),
    ("privfed.models",),
    (
        "privfed.config",
        "privfed.keys",
        "privfed.randomness",
        "privfed.fixed_broadcast",
        "privfed.telemetry",
        "privfed",
    ),
]


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str | None:
    """The module a ``from`` import names, relative ones resolved as Python does."""
    if node.level == 0:
        return node.module
    package = name if is_package else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    if not package:
        return None  # beyond the top-level package: Python refuses it too
    return f"{package}.{node.module}" if node.module else package


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, path.name == "__init__.py")
                if base is None:
                    continue
                for alias in node.names:  # `from privfed.x import y`: y may be a module
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in graph if m in reachable(graph, m))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_server_and_the_deployment_do_not_load_the_training_client():
    graph = import_graph()
    for module in ("privfed.server.app", "privfed.server.loop", "privfed.deployment"):
        assert "privfed.client.app" not in reachable(graph, module), module


def test_the_graph_reader_sees_lazy_imports_and_places_every_module():
    """A check that cannot fail is a defect: the reader must see an import inside a function,
    and the layer table must name every module (privfed itself is the bottom catch-all)."""
    graph = import_graph()
    assert "privfed.privacy.calibration" in graph["privfed.cli"]  # imported inside prepare_run()
    assert layer_of("privfed.audit.report") < layer_of("privfed.privacy.dp_sgd")
    assert layer_of("privfed.audit.canaries") < layer_of("privfed.strategies.base")


def test_the_layers_have_no_exceptions():
    """Each layer names packages or top-level modules, never one module inside a package (a
    module given a layer of its own is an exception to the package's place)."""
    for prefixes in LAYERS:
        for prefix in prefixes:
            assert prefix.count(".") <= 1, prefix


def _mutated_copy(tmp_path: Path, module: str, added: str) -> Path:
    """A copy of the package's sources with ``added`` appended to ``module``'s file."""
    copy = tmp_path / "privfed"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    path = copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
    path.write_text(path.read_text() + added)
    return copy


def test_a_relative_lazy_upward_import_is_seen_as_upward_and_as_a_cycle(tmp_path):
    """The mutation that once passed every check: ``from .cli import main`` inside a function
    in config.py (the bottom layer importing the top one, which imports config back)."""
    lazy = "\n\ndef _late():\n    from .cli import main\n"
    copy = _mutated_copy(tmp_path, "privfed.config", lazy)
    graph = import_graph(copy)
    assert "privfed.cli" in graph["privfed.config"]
    assert "privfed.config -> privfed.cli" in upward_imports(graph)
    assert "privfed.config" in cycles(graph)


def test_relative_imports_resolve_from_packages_and_modules(tmp_path):
    """``from ..privacy import dp_sgd`` in a subpackage's module and ``from . import x`` in a
    package's ``__init__`` name the modules Python would import."""
    copy = _mutated_copy(tmp_path, "privfed.models.head", "\nfrom ..privacy import dp_sgd\n")
    init = copy / "data" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom . import federated\n")
    graph = import_graph(copy)
    assert "privfed.privacy.dp_sgd" in graph["privfed.models.head"]
    assert "privfed.models.head -> privfed.privacy.dp_sgd" in upward_imports(graph)
    assert "privfed.data.federated" in graph["privfed.data"]
