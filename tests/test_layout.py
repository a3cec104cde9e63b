"""The package layering the README's Layout section promises: each package imports only from
the packages before it (function-level imports included), and each says what lives there."""

import ast
import importlib
from pathlib import Path

import pytest

import restransfer

PACKAGE = Path(restransfer.__file__).parent
# lowest first; a module may import its own package and any package earlier in this list
LAYERS = ["paths", "net", "devices", "graph", "suggest", "data", "models", "training", "evaluation", "serving", "tasks", "cli"]


def restransfer_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("restransfer"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            yield node.lineno, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("restransfer"):
                    yield node.lineno, [alias.name]


def layer_of(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem in LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = path.parent.name if path.parent != PACKAGE else path.stem
    allowed = set(LAYERS[: LAYERS.index(own) + 1])
    upward = []
    for line, names in restransfer_imports(path):
        # "from restransfer import data" names the package in the alias
        layers = {layer_of(name) for name in names} - {None}
        upward += [f"line {line}: {layer}" for layer in layers if layer not in allowed]
    assert not upward, f"{path.relative_to(PACKAGE)} imports upward: {upward}"


@pytest.mark.parametrize("package", [layer for layer in LAYERS if (PACKAGE / layer).is_dir()])
def test_every_package_says_what_lives_there(package):
    module = importlib.import_module(f"restransfer.{package}")
    assert module.__doc__ and len(module.__doc__.strip().splitlines()) >= 2


def _task_name_comparisons(path: Path) -> list[str]:
    """Lines comparing something named ``task`` with a task's name (``task == "segmentation"``,
    ``config.task in ("medical", ...)``): a task branch."""
    from restransfer.tasks.registry import TASKS

    def names_task(node):
        return (isinstance(node, ast.Name) and node.id == "task") or (isinstance(node, ast.Attribute) and node.attr == "task")

    def task_names(node):
        values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(v, ast.Constant) and v.value in TASKS for v in values)

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(names_task(side) for side in sides) and any(task_names(side) for side in sides):
                found.append(f"line {node.lineno}")
    return found


SHARED_MODULES = [p for p in MODULES if "tasks" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("path", SHARED_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_shared_machinery_names_no_task(path):
    """What differs between tasks is each task's (its module in tasks/, its entry in
    tasks/registry.py); the shared packages ask the task, never compare its name."""
    branches = _task_name_comparisons(path)
    assert not branches, f"{path.relative_to(PACKAGE)} branches on a task's name: {branches}"


def _autographed_calls(path: Path) -> list[str]:
    """``tf.function(...)`` or ``@tf.function``, and ``.map`` / ``.flat_map`` / ``tf.map_fn`` given a function not
    wrapped in ``plain(...)`` (thread pools' ``.map`` aside): calls that would hand restransfer's
    code to AutoGraph."""
    def wrapped(node):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "plain"

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # a bare @tf.function is no call
            found += [f"line {d.lineno}: @tf.function" for d in node.decorator_list if ast.unparse(d) == "tf.function"]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = ast.unparse(node.func.value)
        if node.func.attr == "function" and receiver == "tf":
            found.append(f"line {node.lineno}: tf.function")
        elif (node.func.attr in ("map", "flat_map") and "pool" not in receiver) or \
                (node.func.attr == "map_fn" and receiver == "tf"):
            if node.args and not wrapped(node.args[0]):
                found.append(f"line {node.lineno}: {receiver}.{node.func.attr}({ast.unparse(node.args[0])})")
    return found


@pytest.mark.parametrize("path", [p for p in PACKAGE.rglob("*.py") if p.name != "graph.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_graph_code_is_traced_without_autograph(path):
    """restransfer.graph: AutoGraph's source rewrite found nothing to convert in restransfer's
    graph code and cost ~1.6 s of a fresh process's first fit, evaluation and export."""
    calls = _autographed_calls(path)
    assert not calls, f"{path.relative_to(PACKAGE)}: use restransfer.graph.traced / plain: {calls}"
