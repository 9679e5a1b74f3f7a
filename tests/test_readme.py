"""The README's code runs as written: each Python block in a fresh interpreter, and every
``python train.py ...`` command it shows is accepted by train.py's checks."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
# Every train.py command the README shows, in code blocks and in `inline code`.
COMMANDS = sorted({c.strip() for c in re.findall(r"(?:^|`|\n)((?:python|torchrun [^`\n]*?) train\.py[^`\n]*)", README)})


def test_the_readme_has_code_to_check():
    assert len(PYTHON_BLOCKS) >= 2 and len(COMMANDS) >= 6, (PYTHON_BLOCKS, COMMANDS)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python-block-{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs_as_written(block):
    """Only torch and torch_bn: the block needs nothing the library does not install."""
    program = block + "\nimport sys\nprint(sorted(m for m in ('torchvision', 'cifar_bn') if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TORCH_BN_CPP": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_train_command_is_accepted(command):
    """train.py's flag checks accept the command (placeholders such as [--epochs N] aside)."""
    import train

    # A {a,b,c} placeholder stands for each of its choices: the first is checked.
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", re.sub(r"\{([^,}]+)[^}]*\}", r"\1", command)))
    argv = words[words.index("train.py") + 1:]
    args = train.parse_args(argv)
    if args.resume:  # runs/NAME stands for a run folder: the flags it may take are checked there
        assert args.resume == "runs/NAME"
        return
    plan = train.plan_from_args(args)
    assert plan["mode"] in ("single", "compare", "deep", "weight-scale", "batch-size")
