"""The package's import graph, read from the source (lazy imports inside functions included):
every import points down the layers below (written once, here), so no module imports itself
back through others; and the server side does not load the training client (Opacus, the models)
to read a config or name a client."""

from __future__ import annotations

import ast
from pathlib import Path

import privfed

ROOT = Path(privfed.__file__).resolve().parent

# Top to bottom: a module may import from its own layer and the layers below it. A module
# belongs to the longest prefix that names it. The audit straddles two levels: its run-level
# report and white-box auditor use DP-SGD and the ledger, while its canaries are records that
# DP-SGD and the federation's data take in, and its canary devices are updates the strategies'
# user-level aggregation takes in (their verdict, user_report, is with the report).
LAYERS: list[tuple[str, ...]] = [
    ("privfed.cli", "privfed.edge", "privfed.edge_gate", "privfed.app_cli"),
    (
        "privfed.simulation",
        "privfed.simulation_delivery",
        "privfed.deployment",
        "privfed.app_bundle",
    ),
    ("privfed.server",),
    ("privfed.client",),
    ("privfed.audit",),
    ("privfed.strategies",),
    ("privfed.privacy",),
    ("privfed.data.federated",),
    ("privfed.audit.canaries", "privfed.audit.user_canaries"),
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


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:  # `from privfed.x import y`: y may be a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_import_points_down_the_layers():
    graph = import_graph()
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]
    assert upward == []


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert cycles == []


def test_the_server_and_the_deployment_do_not_load_the_training_client():
    graph = import_graph()
    for module in ("privfed.server.app", "privfed.server.loop", "privfed.deployment"):
        assert "privfed.client.app" not in reachable(graph, module), module


def test_the_graph_reader_sees_lazy_imports_and_places_every_module():
    """A check that cannot fail is a defect: the reader must see an import inside a function,
    and the layer table must name every module (privfed itself is the bottom catch-all)."""
    graph = import_graph()
    assert "privfed.data.federated" in graph["privfed.cli"]  # imported inside prepare()
    assert layer_of("privfed.audit.report") < layer_of("privfed.privacy.dp_sgd")
    assert layer_of("privfed.audit.canaries") > layer_of("privfed.privacy.dp_sgd")
