"""The package's layers (docs/architecture.md): a module imports only from its own layer
or lower ones, and every module has a layer."""

import ast
from pathlib import Path

import pytest

import flowattn

LAYERS = {
    0: [
        "flowattn.errors",
        "flowattn.names",
        "flowattn.precision",
        "flowattn.configs",
        "flowattn.images",
    ],
    1: ["flowattn.lipschitz", "flowattn.logdet", "flowattn.solvers", "flowattn.metrics"],
    2: ["flowattn.nn"],
    3: ["flowattn.transforms"],
    4: [
        "flowattn",
        "flowattn.models",
        "flowattn.evaluation",
        "flowattn.data",
        "flowattn.capacity",
        "flowattn.plots",
        "flowattn.segmentation.camouflage",
        "flowattn.segmentation.folders",
        "flowattn.segmentation.loss",
        "flowattn.segmentation.scores",
        "flowattn.segmentation.network",
    ],  # fmt: skip
    5: [
        "flowattn.training",
        "flowattn.checkpoint",
        "flowattn.runlock",
        "flowattn.runs",
        "flowattn.segmentation",
        "flowattn.segmentation.fit",
    ],  # fmt: skip
    6: ["flowattn.cli", "flowattn.__main__", "flowattn.segmentation.command"],
}
NAMES = {0: "base", 1: "maths", 2: "networks", 3: "flow steps", 4: "models and data",
         5: "training", 6: "interface"}  # fmt: skip
ROOT = Path(flowattn.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("flowattn", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module``."""
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            inside = name != "flowattn" and module.startswith(name + ".")
            if module == name or inside:  # the root package is only itself
                if best is None or len(name) > len(best[1]):
                    best = (layer, name)
    if best is None:
        raise KeyError(module)
    return best[0]


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets.add(target)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t == "flowattn" or t.startswith("flowattn.")}


MODULES = _modules()


def test_every_module_has_a_layer():
    missing = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"give these modules a layer in LAYERS and docs/architecture.md: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(module):
    layer = layer_of(module)
    higher = [t for t in _imports(module, MODULES[module]) if layer_of(t) > layer]
    assert not higher, (
        f"{module} ({NAMES[layer]}) imports {higher} from a higher layer; move the code "
        "down, or pass what it needs in"
    )


def test_the_check_sees_a_crossing():
    assert layer_of("flowattn.nn.attention_kinds") == 2
    assert layer_of("flowattn.segmentation.command") == 6
    assert "flowattn.models" in _imports("flowattn.training", MODULES["flowattn.training"])
    assert layer_of("flowattn.cli") > layer_of("flowattn.models")
    with pytest.raises(KeyError):
        layer_of("flowattn.new_module")  # an unlisted module is not silently placed


def test_no_two_modules_share_a_name():
    """A reader who sees ``metrics`` or ``attention`` knows which module is meant."""
    names = [path.stem for path in ROOT.rglob("*.py") if path.stem != "__init__"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_the_package_never_imports_the_experiments():
    """``experiments`` sits above the package (it is not installed with it)."""
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "experiments"], module
