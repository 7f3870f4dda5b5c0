"""Shared test fixtures: paths to ../shared (read-only) and the official reference outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SALMONN_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"
AUDIO = FIXTURES / "audio"

# What salmonn caches ($XDG_CACHE_HOME/salmonn: materialized LLMs, the verification record, built models)
# goes to one folder kept between test runs, never the user's ~/.cache; set before any subprocess starts.
TEST_CACHE = Path(tempfile.gettempdir()) / "salmonn-test-cache"
os.environ["XDG_CACHE_HOME"] = str(TEST_CACHE)

# name in reference.npz -> wav file of the official-tiny fixture
REFERENCE_INPUTS = {"speech": "speech_2p5s.wav", "long": "long_40s.wav", "short": "short_0p4s.wav"}


@pytest.fixture(scope="session")
def reference():
    """reference.npz of the official-tiny fixture, as a dict of arrays."""
    with np.load(OFFICIAL_TINY / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference_json():
    return json.loads((OFFICIAL_TINY / "reference.json").read_text())


# --- the real command line, and models exported once per test session ----------------------------

CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def default_sigint() -> None:
    """preexec_fn for a child that is sent Ctrl-C: it gets SIGINT's default disposition even when
    this test run ignores SIGINT (as a shell's background job does). A process started with
    SIGINT ignored keeps ignoring it, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def salmonn(*args, env=None, timeout=600, input=None):
    """Run `salmonn ARGS...` in a subprocess (text mode unless `input` is bytes)."""
    return subprocess.run([sys.executable, "-m", "salmonn_cli", *map(str, args)], capture_output=True,
                          text=not isinstance(input, bytes), env={**CLI_ENV, **(env or {})},
                          timeout=timeout, input=input)


def export_fixture(out, quant, *extra):
    """`salmonn export` of the official-tiny fixture into `out`."""
    r = salmonn("export", "--official-ckpt", OFFICIAL_TINY / "salmonn_tiny.pth",
                "--whisper", OFFICIAL_TINY / "whisper", "--beats", OFFICIAL_TINY / "beats.pt",
                "--llm", OFFICIAL_TINY / "vicuna", "--quant", quant, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def model_f32(tmp_path_factory):
    return export_fixture(tmp_path_factory.mktemp("models") / "tiny-f32", "f32")


@pytest.fixture(scope="session")
def model_q8(tmp_path_factory):
    return export_fixture(tmp_path_factory.mktemp("models") / "tiny-q8_0", "q8_0")
