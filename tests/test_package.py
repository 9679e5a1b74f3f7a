"""The library stands alone: it needs only torch, and never imports the application."""
import subprocess
import sys
import tomllib

import pytest


@pytest.mark.slow
def test_library_imports_none_of_the_application_dependencies():
    """torch_bn needs only torch: importing every module of it pulls in no application package."""
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"  # what torch itself imports (it imports tqdm) does not count
            "import pkgutil, importlib, torch_bn\n"
            "for m in pkgutil.iter_modules(torch_bn.__path__):\n"
            "    if m.name != 'triton_kernels': importlib.import_module('torch_bn.' + m.name)\n"
            "bad = [n for n in ('torchvision', 'tensorboard', 'matplotlib', 'tqdm', 'cifar_bn') "
            "if n in set(sys.modules) - before]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_depends_only_on_torch_and_is_installed_alone():
    """pip install . installs torch_bn and nothing of the application (which runs from the checkout)."""
    with open("pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    # torch, and ninja, which builds the compiled CPU op
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch", "ninja"]
    assert "optional-dependencies" not in project
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["torch_bn*"]
    from setuptools import find_packages

    assert {p.split(".")[0] for p in find_packages(include=["torch_bn*"])} == {"torch_bn"}
