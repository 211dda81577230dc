"""The repository's tree cannot shadow another distribution's modules.

Any Python started in the repository root (``python -m pytest``, ``python -m bench.run``) has the
root on ``sys.path`` ahead of site-packages. A root folder named like a PyPI package that a
dependency imports (transformers >= 5.25 imports Hugging Face's ``kernels``) would be found instead
of it. Only ``hifi_fast`` may be importable from the root under a name that a distribution installs.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_NAMES = {"hifi_fast"}


def _root_importable_names() -> set[str]:
    """Names ``import NAME`` can resolve to from the repository root: folders and ``.py`` files."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or not entry.name.replace("_", "a").isalnum():
            continue  # .git, .venv, egg-info: not identifiers
        if entry.is_dir():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_no_root_folder_or_module_is_named_like_an_installed_distribution_module():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in _root_importable_names() - OWN_NAMES if name in installed}
    assert not clashes, f"root entries shadow installed distributions' modules: {clashes}"


def test_kernels_package_lives_inside_hifi_fast():
    assert not (ROOT / "kernels").exists(), "a root 'kernels/' folder would shadow Hugging Face's kernels"
    assert (ROOT / "hifi_fast" / "kernels" / "__init__.py").is_file()


_CHECK_FROM_ROOT = r"""
import importlib.util, pathlib, sys
root = pathlib.Path.cwd().resolve()
spec = importlib.util.find_spec("kernels")
origin = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations)))
assert origin is None or not origin.startswith(str(root) + "/kernels"), f"'kernels' resolves to the repo: {origin}"
import transformers
from transformers import BertModel, LlamaForCausalLM  # their modules import Hugging Face's kernels
import hifi_fast.kernels, hifi_fast.ops
assert pathlib.Path(hifi_fast.kernels.__file__).resolve().is_relative_to(root / "hifi_fast")
print(transformers.__version__, origin.replace(" ", ""))
"""


def test_transformers_and_own_kernels_import_from_repository_root():
    """The failure of issue 20, run the way the README's test command runs: from the root."""
    result = subprocess.run([sys.executable, "-c", _CHECK_FROM_ROOT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.split()[1]
    try:
        importlib.metadata.version("kernels")  # a dependency of transformers >= 5.25
    except importlib.metadata.PackageNotFoundError:
        return
    assert "site-packages" in origin, f"Hugging Face's kernels is installed, but 'kernels' resolves to {origin}"


def test_wheel_ships_the_native_node_source(tmp_path):
    """A non-editable install builds the C++ autograd node from the source inside the package."""
    import os
    import shutil
    import zipfile

    from hifi_fast.tuning import native

    assert native.SOURCE.is_relative_to(ROOT / "hifi_fast") and native.SOURCE.is_file()
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "hifi_fast", tree / "hifi_fast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
        cwd=tree, capture_output=True, text=True, timeout=600, env={**os.environ, "HIFI_FAST_SKIP_CUDA_BUILD": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "hifi_fast/tuning/head_slice_linear.cpp" in zipfile.ZipFile(wheel).namelist()
