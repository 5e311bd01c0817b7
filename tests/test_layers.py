"""The package's layers, read from its import statements (every import, also those inside
functions): core <- elastic (worker side) <- launch (launcher side) <- cli, commands, api. A
module imports only its own layer or those below, and no import cycle exists between modules."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "hvd_abs"
LAYERS = {"core": 0, "elastic": 1, "launch": 2, "top": 3}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("elastic", "launch"):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "commands", "api", "__main__", "testing"):
        return "top"
    return "core"


def import_graph() -> dict[str, set[str]]:
    """module -> the hvd_abs modules it imports (`from hvd_abs.x import y` counts hvd_abs.x.y when
    that is a module, else hvd_abs.x), but those under `if TYPE_CHECKING:`."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
            guard.body = []  # (imports for type hints only never run)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            deps |= {t for t in targets if t == "hvd_abs" or t.startswith("hvd_abs.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in import_graph().items() for d in deps
              if d != "hvd_abs" and LAYERS[layer(d)] > LAYERS[layer(m)]]
    assert not upward, upward


def test_no_import_cycle() -> None:
    graph = import_graph()
    graph = {m: {d for d in deps if d != "hvd_abs"} for m, deps in graph.items()}  # (its init imports nothing)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_graph_reader_sees_imports_inside_functions() -> None:
    # (The test above is only as good as its reader: a lazy import must count.)
    assert "hvd_abs.elastic.job" in import_graph()["hvd_abs.elastic.worker"]
    assert layer("hvd_abs.training.trainer") == "core" and layer("hvd_abs.launch.standby") == "launch"
