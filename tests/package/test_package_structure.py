"""The package reads in one direction: every module sits in a layer of the stack below and imports
only from the layers beneath its own, so no import cycle exists; no module reaches for another's
private names. Imports are read from the source with ast, so one inside a function, which only runs
on some path, counts too."""

import ast
from pathlib import Path
from typing import Dict, List, Set

import ckbn

PACKAGE = Path(ckbn.__file__).resolve().parent


def imports_of(path: Path) -> Set[str]:
    """The ckbn modules that ``path`` imports, by their names inside the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("ckbn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ckbn."))
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` as a list of modules, or [] when it has none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(module: str) -> List[str]:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


# ckbn's modules from the bottom up, as docs/development.md describes them. A new module takes its
# place here; a module imports only from layers below its own.
STACK = [
    ("helpers that import no ckbn module", {"_build_info", "activations", "checkpointing", "surgery"}),
    ("the torch reference of the arithmetic; the frozen-statistics switch", {"reference", "running_stats"}),
    ("the operators: backend, typed wrappers, fakes, batching rules", {"ops"}),
    ("the autograd Function", {"autograd"}),
    ("the training, eval and running-statistics policy", {"policy"}),
    ("the layers", {"modules", "norm_act", "functional"}),
    ("layers built on layers", {"distributed", "fusion"}),
    ("whole-model tools", {"conversion", "recalibration", "block_checkpointing"}),
]


def layer_violations(graph: Dict[str, Set[str]], stack) -> List[str]:
    """Each import of ``graph`` that does not go to a layer below the importer's, and each module
    missing from ``stack``."""
    level = {module: i for i, (_, modules) in enumerate(stack) for module in modules}
    found = [f"{module} is in no layer" for module in sorted(graph.keys() - level.keys())]
    for module in sorted(graph.keys() & level.keys()):
        for imported in sorted(graph[module]):
            if level.get(imported, len(stack)) >= level[module]:
                found.append(f"{module} ({stack[level[module]][0]}) imports {imported}")
    return found


def test_the_layer_checker_finds_an_upward_import_and_a_missing_module():
    stack = [("bottom", {"a"}), ("top", {"b"})]
    assert layer_violations({"a": set(), "b": {"a"}}, stack) == []
    assert layer_violations({"a": {"b"}, "b": set(), "c": set()}, stack) == ["c is in no layer", "a (bottom) imports b"]


def test_every_module_imports_only_from_the_layers_below_its_own():
    graph = import_graph()
    assert "reference" in graph["ops"] and "ops" in graph["autograd"]  # the reader sees relative imports
    assert not layer_violations(graph, STACK)


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def private_uses(path: Path, siblings: Set[str]) -> List[str]:
    """``module._name`` attribute reads and ``from .module import _name`` imports of sibling modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in siblings:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in siblings:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_the_checker_finds_private_uses(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import reference\nfrom .modules import _helper, public\nreference._check(1)\n")
    assert set(private_uses(source, {"reference", "modules"})) == {"modules._helper", "reference._check"}


def test_no_module_uses_another_modules_private_names():
    graph = import_graph()
    uses = {
        name: private_uses(PACKAGE / f"{name}.py", graph.keys() - {name})
        for name in list(graph) + ["__init__", "__main__"]
    }
    assert not {name: found for name, found in uses.items() if found}
