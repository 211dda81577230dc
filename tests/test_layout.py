"""The package's tree is its architecture (``docs/ARCHITECTURE.md``): shared modules at the bottom,
then the stages -- tuning, selecting, storing --, the ``patch`` facade, the package's public API and
the command line on top. No module imports from a stage above its own (a lazy import inside a
function counts too), the two stages of one level do not import each other, and no import circle
exists anywhere.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hifi_fast"
# Longest prefix wins. Shared at level 0; a stage may import any lower level.
LEVELS = {
    "hifi_fast._version": 0, "hifi_fast.config": 0, "hifi_fast.heads": 0, "hifi_fast.adapters": 0,
    "hifi_fast.ops": 0, "hifi_fast.kernels": 0, "hifi_fast.backends": 0, "hifi_fast.cuda_ext": 0,
    "hifi_fast.tuning": 1,
    "hifi_fast.selecting": 2,
    "hifi_fast.storing": 3,
    "hifi_fast.api": 4,
    "hifi_fast": 5,  # the package's __init__: the public API
    "hifi_fast.cli": 6,
    "hifi_fast.__main__": 7,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _level(module: str) -> int:
    prefix = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hifi_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "hifi_fast":
                continue
            for alias in node.names:  # ``from . import ops`` imports the module hifi_fast.ops
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_stage(module):
    own = _level(module)
    higher = sorted(name for name in GRAPH[module] if _level(name) > own)
    assert not higher, f"{module} (level {own}) imports {higher} from above it"
    if own in (1, 2, 3):  # stages import only lower levels, never a sibling of their own level
        siblings = sorted(name for name in GRAPH[module] if _level(name) == own and
                          name.split(".")[1] != module.split(".")[1])
        assert not siblings, f"{module} imports {siblings} from another stage of its level"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(GRAPH[module]):
            if state.get(name) == 1:
                circle = path[path.index(name):] + [name]
                pytest.fail("import circle: " + " -> ".join(circle))
            if name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_every_module_has_a_level_and_the_stages_exist():
    for stage in ("selecting", "tuning", "storing", "cli"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    assert all(isinstance(_level(m), int) for m in MODULES)
    assert {m for m in MODULES if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir()} <= {
        "hifi_fast._version", "hifi_fast.__main__", "hifi_fast.api", "hifi_fast.backends", "hifi_fast.config",
        "hifi_fast.cuda_ext", "hifi_fast.heads",
    }, "a new top-level module: put it in the stage it serves, or name it here as shared"
