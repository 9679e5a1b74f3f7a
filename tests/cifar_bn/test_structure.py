"""The application's structure: imports flow one way (train.py -> cifar_bn -> torch_bn), with no
circle, and a launch is checked before torch is imported."""
import ast
import os
import subprocess
import sys

import pytest

import cifar_bn

PACKAGE = os.path.dirname(cifar_bn.__file__)
# Modules that check a launch: they must not import torch (or anything that does) at import time.
TORCH_FREE = ("config", "runs")


def imports_of(path: str, package: str = "cifar_bn") -> set[str]:
    """The cifar_bn modules a file imports anywhere in it (functions included: a circle closed by
    an import inside a function is still a circle), by their name within the package."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:  # from . import x / from .x import y
                names = [base] if base else [a.name for a in node.names]
            elif base == package:
                names = [a.name for a in node.names]
            elif base.startswith(package + "."):
                names = [base[len(package) + 1:]]
            else:
                names = []
            out.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    return out


def module_graph(folder: str) -> dict[str, set[str]]:
    """Module name -> the package modules it imports, for every .py file of the package folder."""
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py")}
    return {m: imports_of(os.path.join(folder, m + ".py")) & modules - {m, "__init__"} for m in modules}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_circle_finder_finds_a_circle_through_an_import_inside_a_function(tmp_path):
    """The check below can fail: two modules that import each other (one of them inside a function,
    as distributed.py and training.py once did) are a circle."""
    (tmp_path / "a.py").write_text("from .b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import other\n")
    (tmp_path / "c.py").write_text("import cifar_bn.a\n")
    graph = module_graph(str(tmp_path))
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_circle(graph) == ["a", "b", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_cifar_bn_has_no_import_circle():
    graph = module_graph(PACKAGE)
    assert "training" in graph and graph["distributed"], graph  # the graph was read
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_launch_checks_are_leaves(module):
    """config.py and runs.py import nothing of cifar_bn, so that anything may import them."""
    assert module_graph(PACKAGE)[module] == set()


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--compare", "--norm", "nn"], 2),
                                        (["--lr", "0"], 2), (["--resume", "nowhere"], 2)])
def test_help_and_refused_launches_do_not_import_torch(argv, code, tmp_path):
    """--help and a launch refused for its flags are answered before torch (2-3 s to import) is."""
    program = ("import runpy, sys\n"
               f"sys.argv = ['train.py', *{argv!r}]\n"
               "try:\n"
               "    runpy.run_path('train.py', run_name='__main__')\n"
               "except SystemExit as e:\n"
               "    code = e.code\n"
               "heavy = [m for m in ('torch', 'torchvision', 'tensorboard', 'matplotlib', 'numpy') if m in sys.modules]\n"
               "print(code, heavy)\n")
    root = os.path.dirname(PACKAGE)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.stdout.strip().splitlines()[-1] == f"{code} []", result.stdout + result.stderr
