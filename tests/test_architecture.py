"""The package's shape: imports flow one way without cycles, user classes stay thin, functions short.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts
as much as one at the top of a module; imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_scvi"

#: layers from the bottom up: a module may import its own layer and the layers below it
LAYERS = [
    {"settings", "c_kernels"},
    {"distributions"},
    {"data"},
    {"models", "guides"},
    {"infer", "io"},
    {"diagnostics", "differential", "metrics", "plotting", "pp"},
    {"api"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str) -> set[str]:
    """Package modules that module ``name`` imports at run time (at any depth of its code)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pyro_scvi"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pyro_scvi"))
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else "__init__"
    for rank, layer in enumerate(LAYERS):
        if top in layer:
            return rank
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py: add it to LAYERS")


def test_the_package_has_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_from_data_to_model_to_inference_to_the_user_api(name):
    rank = layer_of(name)
    upward = sorted(target for target in GRAPH[name] if layer_of(target) > rank)
    assert not upward, f"{name} (layer {rank}) imports higher layers: {upward}"


def _class_lines(path: Path, class_name: str) -> int:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"no class {class_name} in {path}")


def test_the_scvi_user_class_is_a_thin_composition():
    assert _class_lines(PACKAGE / "api" / "scvi.py", "SCVI") <= 300
    assert sum(1 for _ in (PACKAGE / "api" / "scvi.py").open()) <= 300


def _code_lines(node: ast.FunctionDef) -> int:
    """Lines of a function without its docstring."""
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str)
    start = first.end_lineno + 1 if docstring and len(node.body) > 1 else node.lineno
    return node.end_lineno - start + 1


def test_no_function_is_longer_than_80_lines_of_code():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 80:
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, "split these functions: " + "; ".join(long)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    """The graph above is not vacuous: known edges are found."""
    assert "pyro_scvi.api.base" in GRAPH["pyro_scvi.api.scvi"]
    assert "pyro_scvi.data.registry" in GRAPH["pyro_scvi.api.base"]
    assert (
        layer_of("pyro_scvi.api.scvi")
        > layer_of("pyro_scvi.infer.training")
        > layer_of("pyro_scvi.data.loader")
    )
