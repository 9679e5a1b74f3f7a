"""The run folder: its file names, the rule that a run is never overwritten, and how its files are
written (atomically) and read back (a damaged file is one clear error, never a traceback).

A leaf of the application: it imports nothing of cifar_bn, and torch only inside the checkpoint
functions, so that train.py can check a launch before torch is imported.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

CHECKPOINT = "checkpoint.pt"  # one run's model, optimizer and history, rewritten at every epoch end
VECTORIZED_CHECKPOINT = "vectorized_checkpoint.pt"  # a vectorized batch's models, in the batch's root folder
SUMMARY = "summary.json"  # a finished run's results
RUN_FILE = "run.json"  # what train.py launched into the folder, so that --resume can launch it again


class RunExistsError(Exception):
    """A run folder already exists (runs are never overwritten), or is not a run folder."""


class DamagedRunError(Exception):
    """A run folder's file cannot be read back; the message names it and what to do instead."""


def holds_run(run_dir: str) -> bool:
    """Whether run_dir already has a run's files (checkpoint, summary or TensorBoard events)."""
    return os.path.isdir(run_dir) and any(
        f in (CHECKPOINT, SUMMARY) or f.startswith("events.out.tfevents") for f in os.listdir(run_dir))


def keep_aside(path: str, label: str) -> str:
    """Rename ``path`` to ``<stem>.<label>[.k]<ext>`` (never over an existing file); return the new path."""
    stem, ext = os.path.splitext(path)
    new, k = f"{stem}.{label}{ext}", 1
    while os.path.exists(new):
        new, k = f"{stem}.{label}.{k}{ext}", k + 1
    os.replace(path, new)
    return new


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into ``path + ".tmp"``, then rename it over ``path``: a crash or Ctrl-C at any
    moment leaves the old file or the new one, never a part of either (and no ``.tmp``)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # interrupted while writing: the old file stands
            os.remove(tmp)


def write_json(path: str, obj: dict[str, Any]) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def _damaged(path: str, error: Exception) -> DamagedRunError:
    return DamagedRunError(
        f"{path} is damaged and cannot be read back ({type(error).__name__}); nothing was changed. Restore it "
        f"from a copy, or move it aside (--resume then retrains that run from its first epoch), or start a new run")


def read_json(path: str) -> dict[str, Any]:
    """The JSON object at ``path``; DamagedRunError when it does not parse as one."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None
    if not isinstance(obj, dict):
        raise _damaged(path, TypeError("not a JSON object"))
    return obj


def save_checkpoint(path: str, checkpoint: dict[str, Any]) -> None:
    """torch.save ``checkpoint`` to ``path``, atomically."""
    import torch

    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` on the CPU, or None when there is none yet; DamagedRunError
    when the file cannot be read back (truncated, overwritten, not a checkpoint)."""
    import torch

    if not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors for a bad file: RuntimeError, EOFError, UnpicklingError, ...
        raise _damaged(path, e) from None
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        raise _damaged(path, TypeError("not a checkpoint"))
    return checkpoint


def check_readable(root: str) -> None:
    """Read back every checkpoint and summary under ``root`` (the files a resume reads), so that a
    damaged one is refused before anything in the folder is renamed or written."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name in (CHECKPOINT, VECTORIZED_CHECKPOINT):
                load_checkpoint(path)
            elif name in (SUMMARY, RUN_FILE):
                read_json(path)
