"""The layers of the tree, read from its imports (every `import`, also inside functions): no import
cycle among the modules of salmonn_cli/, export/ and train/; the runtime (salmonn_cli) imports
neither export nor train; train does not import export (export converts train's checkpoints)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("salmonn_cli", "export", "train")
# package -> the packages it must never import
FORBIDDEN = {"salmonn_cli": {"export", "train"}, "train": {"export"}}


def module_files(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name `source` imports, relative imports resolved; `from a import b` gives a and a.b."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports (a name that is not a module counts as its nearest
    enclosing module: `from a.b import f` is an import of a.b)."""
    modules = module_files(root)

    def nearest_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        found = {nearest_module(name) for name in imported_names(path.read_text(), module, is_package)}
        graph[module] = {m for m in found if m is not None and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], ()))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_runtime_imports_neither_export_nor_train_and_train_does_not_import_export():
    assert upward_imports(import_graph()) == []


def test_the_scan_sees_a_cycle_an_upward_import_and_imports_inside_functions(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "salmonn_cli" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "salmonn_cli" / "b.py").write_text("import salmonn_cli.c\n")
    (tmp_path / "salmonn_cli" / "c.py").write_text("from salmonn_cli import a\n")
    (tmp_path / "train" / "t.py").write_text("def h():\n    import export.e\n")
    (tmp_path / "export" / "e.py").write_text("from train.t import h\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["salmonn_cli.a", "salmonn_cli.b", "salmonn_cli.c"], ["export.e", "train.t"]]
    assert upward_imports(graph) == ["train.t imports export.e"]
    assert cycles({"x": {"y"}, "y": set()}) == []
