"""The package layering the README's Layout section promises: each package imports only from
the packages before it (function-level imports included), and each says what lives there."""

import ast
import importlib
from pathlib import Path

import pytest

import restransfer

PACKAGE = Path(restransfer.__file__).parent
# lowest first; a module may import its own package and any package earlier in this list
LAYERS = ["paths", "net", "devices", "suggest", "data", "models", "training", "evaluation", "serving", "tasks", "cli"]


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
