"""The package's shape: no import cycles inside hf_flop and its command line ``hf_flop_cli``, a
self-contained ``hf_flop/modeling``, and a command line that imports only the standard library until it runs;
layers that import downwards only (the library, then the application layer ``hf_flop/app``, then the command
line); no module over 450 lines and no class over 350.

Imports are read with ``ast`` (nothing is executed), at every level: a function-level import that
closes a cycle is still a cycle, only deferred. ``TYPE_CHECKING`` blocks count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import hf_flop
import hf_flop_cli

PACKAGE = Path(hf_flop.__file__).resolve().parent
# beside hf_flop, not in it, so that it parses without importing hf_flop; its imports are read with hf_flop's
CLI_PACKAGE = Path(hf_flop_cli.__file__).resolve().parent
assert CLI_PACKAGE.parent == PACKAGE.parent, "hf_flop and hf_flop_cli are installed from different places"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in (PACKAGE, CLI_PACKAGE) for p in sorted(package.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """hf_flop modules that ``name`` imports explicitly (implicit parent-package imports are left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # "from pkg import sub" imports the submodule pkg.sub
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_reader_sees_the_package():
    graph = _graph()
    assert {"hf_flop", "hf_flop.model", "hf_flop.modeling", "hf_flop.modeling.modeling_flop"} <= set(graph)
    # a few edges it must see, at module and function level, relative and absolute
    assert "hf_flop.lookup" in graph["hf_flop.accounting"]
    assert "hf_flop.modeling.block_sparse" in graph["hf_flop.modeling.modeling_flop"]
    assert "hf_flop.config" in graph["hf_flop"]
    assert {"hf_flop.config", "hf_flop_cli.choices"} <= graph["hf_flop_cli"]


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_inside_hf_flop():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_modeling_imports_nothing_from_the_rest_of_the_package():
    """hf_flop/modeling is shipped as remote code next to saved weights: it must run without hf_flop."""
    graph = _graph()
    for name, targets in graph.items():
        if name == "hf_flop.modeling" or name.startswith("hf_flop.modeling."):
            outside = {t for t in targets if not (t == "hf_flop.modeling" or t.startswith("hf_flop.modeling."))}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_command_line_imports_only_the_standard_library_at_module_level():
    """``hf-flop --help`` must not wait for torch: hf_flop_cli imports hf_flop, torch & co. inside functions."""
    for path in sorted(CLI_PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:  # relative imports stay in hf_flop_cli
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in sys.stdlib_module_names, f"{path.name} imports {name} at module level"


# --- layers: the library <- the application layer (hf_flop/app) <- the command line (hf_flop_cli) ------------------
# ``python -m hf_flop`` runs the command line: hf_flop/__main__.py is its entry point, which nothing imports
ENTRY_POINT = "hf_flop.__main__"


def _in(package: str, name: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer(name: str) -> str:
    if _in("hf_flop_cli", name):
        return "command line"
    if _in("hf_flop.app", name):
        return "application"
    return "entry point" if name == ENTRY_POINT else "library"


def test_the_layers_see_their_real_imports():
    """The layer rules below read real edges: the application imports the library, the command line the application."""
    graph = _graph()
    assert {"hf_flop.files", "hf_flop.app.options"} <= graph["hf_flop.app.job"]
    assert "hf_flop.app.job" in graph["hf_flop_cli"] and "hf_flop_cli" in graph[ENTRY_POINT]
    assert {_layer(name) for name in graph} == {"library", "application", "command line", "entry point"}


def test_the_library_never_imports_the_application_layer_or_the_command_line():
    """The library is usable, and testable, without either: what a CLI user sees is theirs to word."""
    found = {name: sorted(t for t in targets if _layer(t) != "library") for name, targets in _graph().items()}
    wrong = {name: above for name, above in found.items() if above and _layer(name) == "library"}
    assert not wrong, f"the library imports layers above it: {wrong}"


def test_the_application_layer_never_imports_the_command_line():
    """The job takes typed options (JobOptions), which the command line builds from what it parsed."""
    found = {
        name: sorted(t for t in targets if _layer(t) in ("command line", "entry point"))
        for name, targets in _graph().items()
    }
    wrong = {name: above for name, above in found.items() if above and _layer(name) == "application"}
    assert not wrong, f"the application layer imports the command line: {wrong}"


# --- size --------------------------------------------------------------------------------------------------------------
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 350


def test_no_module_over_450_lines_and_no_class_over_350():
    """One idea per file: a module or a class past these sizes holds several (a class from its first line to its last)."""
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"class {name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "over the size limits: " + "; ".join(too_long)
