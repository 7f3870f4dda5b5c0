"""The PyTorch side of the project (export/, train/: the `train` extra) as a program of its own.

The runtime stays torch-free and never imports those packages: `salmonn export` becomes `python -m
export` with the same arguments, and the default model's first build runs `python -m export.nano`.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import NoReturn

from salmonn_cli.errors import INTERRUPTED, ReportedError, SalmonnError

# what export and the default model's build import (pyproject's `train` extra), checked before starting
TRAINING_MODULES = ("export", "torch", "transformers", "safetensors", "gguf", "onnx")


def missing_training_module() -> str | None:
    """The first module of the training side this installation lacks; None when it has them all."""
    return next((name for name in TRAINING_MODULES if importlib.util.find_spec(name) is None), None)


def module_command(module: str, args) -> list[str]:
    # -P (Python 3.11+): the current folder does not go first on the import path, so a folder of the
    # user's named like ours (export/, train/) is never run instead of it
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", module, *map(str, args)]


def become_module(module: str, args) -> NoReturn:
    """Replace this process by `python -m MODULE ARGS`: the same process id, standard streams, signals
    and exit code, as if the command had been that program all along."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, module_command(module, args))


def run_module(module: str, args, what: str) -> None:
    """Run `python -m MODULE ARGS` to its end with its stdout on our stderr (our stdout is the
    command's answer). It reports its own failure in one line; ReportedError carries its exit code."""
    child = subprocess.Popen(module_command(module, args), stdout=2)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # it got the same Ctrl-C: let it clean up after itself first; if it said "interrupted" (its exit
        # code says so), that line stands for both
        if child.wait() == INTERRUPTED:
            raise ReportedError(f"{what} interrupted", exit_code=INTERRUPTED) from None
        raise
    if code < 0:
        raise SalmonnError(f"{what} was stopped by signal {-code}")
    if code:
        raise ReportedError(f"{what} failed", exit_code=code)
