"""The layering: tools -> engine -> model. The model side never imports the engine, not even
inside a function or through another module (a static scan of every import statement)."""
import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "randwire_d2")
MODEL_SIDE = (
    "randwire_d2.graphs",
    "randwire_d2.modeling",
    "randwire_d2.config",
    "randwire_d2.checkpoint",
    "randwire_d2.data",
    "randwire_d2.evaluation",
    "randwire_d2.solver",
)
ENGINE = "randwire_d2.engine"


def _modules():
    """{dotted name: file} of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(root, name)
    return found


def _imports(module, path, known):
    """The package's modules that ``module`` imports anywhere in its file."""
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            targets = [parent] + [f"{parent}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: that module
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


def _reachable(start, graph):
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def _import_graph():
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_model_side_never_imports_the_engine():
    graph = _import_graph()
    for root in MODEL_SIDE:
        start = [m for m in graph if m == root or m.startswith(root + ".")]
        assert start, root
        engine = sorted(m for m in _reachable(start, graph) if m == ENGINE or m.startswith(ENGINE + "."))
        assert not engine, f"{root} imports {engine}"


def test_the_scan_sees_engine_imports():
    """The scan is not vacuous: modules above the engine are seen to import it."""
    graph = _import_graph()
    assert "randwire_d2.engine.trainer" in graph["randwire_d2.engine"]
    assert ENGINE in graph["randwire_d2.sweep.report"]  # from ..engine import RESULTS_FILE
    assert "randwire_d2.config" in graph["randwire_d2.engine.run_settings"]  # from ..config import ...
    assert "randwire_d2.engine.errors" in _reachable(["randwire_d2.sweep.plan"], graph)  # via a function-level import
