"""The package's layers run one way, with no import cycle, and each sub-package imports on its own.

public face (torch_secorder, optim, testing, cli, plot, progress, integrations)
  -> core (the API, the method choice, the generic method)
  -> backprop (the exact engine: plan, chain, graph, rules)
  -> losses (what each supported loss is, its curvature in the model output)
  -> ops, reference_ops, memory (the compiled ops and their pure-torch references)
  -> _extension, _build_config, and helpers that import nothing of ours
"""

import ast
import pathlib
import subprocess
import sys

import pytest

from torch_secorder.backprop import rules

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "torch_secorder"

# lowest first: a module may import from its own layer or a lower one
LAYERS = [
    ("base", ["_build_config", "_extension", "_errors", "_forward_hooks", "_forward_pass", "_gradient_hooks"]),
    ("ops", ["ops", "reference_ops", "memory"]),
    ("losses", ["losses"]),
    ("backprop", ["backprop"]),
    ("core", ["core"]),
    ("public", ["__init__", "__main__", "optim", "testing", "cli", "plot", "progress", "integrations"]),
]


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name):
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def layer_of(name):
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def our_imports(path):
    """[(imported module, line, inside a function)] for every import of torch_secorder modules in path."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for parent in ast.walk(tree)
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(parent)
        if node is not parent
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # from a package import a submodule: the submodule is what is imported
            targets = [
                f"{module}.{alias.name}"
                if is_package(module)
                and (
                    is_package(f"{module}.{alias.name}")
                    or (PACKAGE.parent / f"{module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                )
                else module
                for alias in node.names
            ]
        else:
            continue
        found += [
            (target, node.lineno, id(node) in nested)
            for target in targets
            if target == "torch_secorder" or target.startswith("torch_secorder.")
        ]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path):
    name = module_name(path)
    for target, line, _ in our_imports(path):
        assert layer_of(target) <= layer_of(name), (
            f"{path.name}:{line} imports {target} ({LAYERS[layer_of(target)][0]}) from the lower layer "
            f"{LAYERS[layer_of(name)][0]}"
        )


def test_no_function_level_import_of_our_modules_and_every_lazy_import_says_why():
    for path in MODULES:
        lines = path.read_text().splitlines()
        for target, line, nested in our_imports(path):
            assert not nested, f"{path.name}:{line}: a function-level import of {target} (a cycle in hiding)"
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    statement = lines[node.lineno - 2 : node.end_lineno]  # the reason on the line above, or on it
                    assert any("#" in line for line in statement), (
                        f"{path.name}:{node.lineno}: a lazy import without its reason"
                    )


def test_no_import_cycle():
    graph = {}
    for path in MODULES:
        graph[module_name(path)] = {target for target, _, nested in our_imports(path) if not nested}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if target != name and not name.startswith(target + "."):  # a package's own __init__ is not a cycle
                visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize(
    "name",
    [
        "torch_secorder.losses",
        "torch_secorder.backprop",
        "torch_secorder.backprop.rules",
        "torch_secorder.backprop.graph",
        "torch_secorder.core",
        "torch_secorder.ops",
        "torch_secorder.optim",
        "torch_secorder.testing",
        "torch_secorder.core.hessian_diagonal",
    ],
)
def test_each_subpackage_imports_on_its_own(name):
    """In a fresh interpreter, first thing: no import order of torch_secorder/__init__.py to lean on."""
    # the package's __init__ runs first whatever is imported; empty it out of the way by importing the
    # sub-package through importlib with the parent's __init__ replaced by an empty module
    code = (
        "import importlib.util, sys, types, pathlib\n"
        f"root = pathlib.Path({str(PACKAGE)!r})\n"
        "package = types.ModuleType('torch_secorder'); package.__path__ = [str(root)]\n"
        "sys.modules['torch_secorder'] = package\n"
        f"importlib.import_module({name!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_rule_family_has_its_test_file():
    """tests/rules/test_rule_<family>.py for every file of backprop/rules/ that registers a rule."""
    families = {module.__name__.rpartition(".")[2] for module in rules.FAMILIES}
    on_disk = {path.stem for path in (PACKAGE / "backprop" / "rules").glob("*.py")}
    helpers = {"__init__", "registry", "columns", "shared_weight", "gemm"}
    assert families == on_disk - helpers, "a rule file not in rules.FAMILIES, or a helper not named here"
    tests = pathlib.Path(__file__).parent / "rules"
    missing = [family for family in sorted(families) if not (tests / f"test_rule_{family}.py").exists()]
    assert not missing, f"no tests/rules/test_rule_<family>.py for {missing}"
