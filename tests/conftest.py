"""Shared test fixtures: paths to ../shared (read-only) and the official reference outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SALMONN_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"
AUDIO = FIXTURES / "audio"

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
