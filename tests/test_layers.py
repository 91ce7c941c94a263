"""The package's layers: a module imports only its own layer or lower ones, and no import
circle exists, lazy (inside a function) or not.  Imports under `if TYPE_CHECKING:` are
annotations, not imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergealign_fast"
# Lowest first: the first part of a module's name below mergealign_fast gives its layer.
LAYERS = [("_version", "errors", "units", "dtypes", "progress", "_native", "_cuda"),
          ("kernels",), ("io",), ("sources",), ("vocabulary",), ("methods",), ("output",), ("plan",),
          ("engine",), ("mergekit",), ("api",), ("tools", "evaluation"), ("cli", "__main__")]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path):
    """The package modules a module imports (the names it takes from a package may be
    submodules: each counts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if _is_type_checking(node)
               for n in ast.walk(node)}
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found = PACKAGE.parent / sub.replace(".", "/")
                native = list(found.parent.glob(f"{found.name}.*.so"))  # _native, _cuda
                yield sub if found.with_suffix(".py").exists() or found.is_dir() or native \
                    else target
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergealign_fast"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mergealign_fast."))


def _graph():
    return {_module(p): {m for m in _imports(p) if m != _module(p)}
            for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    # The package itself is its public face, above every layer (its names load on first use).
    return LAYER_OF[parts[1]] if len(parts) > 1 else len(LAYERS)


def test_no_module_imports_a_higher_layer():
    graph = _graph()
    wrong = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in graph.items()
             for t in targets if _layer(t) > _layer(m)]
    assert wrong == []


def test_no_import_circle():
    graph = _graph()
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
