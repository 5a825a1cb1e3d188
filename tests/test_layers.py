"""The package's layers, read as a map of imports: no module imports a higher layer.

    0 the method's core: time, random draws, the flow map, backward simulation, causal generation, objectives
    1 components: networks (models), worlds and their judges, the data layer, export
    2 machinery: the generic training loop and checkpoints, the sweep engine and pictures
    3 run kinds (each a method and its config)
    4 the assembly: config composition, lineage, building roles and trainers
    5 recipes (what a command does, callable from Python) and the Python API (a trained run to call and sample)
    6 the command line

Imports inside a function count as much as top-level ones.
"""

import ast
from pathlib import Path

import anystep

LAYERS = [
    ("errors", "rng", "time", "flowmap", "global_batch", "backward_simulation", "causal", "objectives"),
    ("models", "worlds", "data", "export"),
    ("train", "evaluate"),
    ("kinds",),
    ("config", "configs", "lineage", "build"),
    ("recipes", "api"),
    ("cli", "__main__", "__init__"),
]
ROOT = Path(anystep.__file__).parent


def layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS")


def imported(path: Path) -> set[str]:
    """The anystep modules ``path`` imports (relative imports resolved), as dotted names below ``anystep``."""
    package = path.relative_to(ROOT).with_suffix("").parts
    package = package[:-1]   # the package a module (or an __init__) belongs to
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                names = [".".join(base + ([node.module] if node.module else []))] if node.module else \
                    [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("anystep"):
                names = [node.module.removeprefix("anystep").lstrip(".")]
            else:
                continue
            out.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("anystep.") for a in node.names if a.name.startswith("anystep."))
    return out


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer(module)
        for target in imported(path):
            if layer(target) > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The map itself: a core module that imported the assembly would be found."""
    probe = ROOT / "objectives" / "flowmap.py"
    assert layer("objectives.flowmap") == 0 and layer("build") == 4
    assert "time" in imported(probe) and "flowmap" in imported(probe)
