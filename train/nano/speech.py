"""Speech from flite (Debian `flite`): one voice, optional slower/faster speech and a shifted pitch.

flite is deterministic: the same voice, settings and text give the same samples.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile

from salmonn_cli.audio import resample
from salmonn_cli.errors import SalmonnError

FLITE = "flite"
FLITE_PACKAGE = "flite"
SAMPLE_RATE = 16000
HELD_OUT_VOICE = "rms"
# kal is the 8 kHz (telephone-band) build of the kal16 speaker; awb_time only speaks clock times
TRAIN_VOICES = ("slt", "awb", "kal16", "kal")
TRAIN_VOICE_WEIGHTS = (0.35, 0.3, 0.2, 0.15)
VOICE_SPEAKER = {"slt": "woman", "rms": "man", "awb": "man", "kal16": "man", "kal": "man"}
# median f0 of the default voices (Hz, measured on one sentence); flite's rms ignores a pitch target
VOICE_F0 = {"slt": 178.0, "awb": 133.0, "kal16": 95.0, "kal": 95.0, "rms": 103.0}
FLITE_TIMEOUT_S = 60


class SpeechError(SalmonnError):
    """flite is missing, lacks a voice, or failed."""


@dataclass(frozen=True)
class Voice:
    name: str
    stretch: float = 1.0            # duration_stretch: > 1 speaks slower
    f0: float | None = None         # target mean pitch (Hz); None keeps the voice's own

    def flite_args(self) -> list[str]:
        args = ["-voice", self.name]
        if self.stretch != 1.0:
            args += ["--setf", f"duration_stretch={self.stretch:.3f}"]
        if self.f0 is not None:
            args += ["--setf", f"int_f0_target_mean={self.f0:.1f}"]
        return args


def check_flite(voices: tuple[str, ...]) -> None:
    if shutil.which(FLITE) is None:
        raise SpeechError(f"flite is not installed (apt-get install {FLITE_PACKAGE})")
    listed = subprocess.run([FLITE, "-lv"], capture_output=True, text=True, timeout=FLITE_TIMEOUT_S).stdout
    available = set(listed.split(":", 1)[-1].split())
    missing = [v for v in voices if v not in available]
    if missing:
        raise SpeechError(f"flite lacks voice(s) {', '.join(missing)} (it has {', '.join(sorted(available))})")


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """flite's waveform for `text`, float64 at 16 kHz."""
    fd, path = tempfile.mkstemp(suffix=".wav", prefix="nano-flite-")
    os.close(fd)
    try:
        result = subprocess.run([FLITE, *voice.flite_args(), "-t", text, "-o", path],
                                capture_output=True, text=True, timeout=FLITE_TIMEOUT_S)
        if result.returncode != 0:
            raise SpeechError(f"flite failed on {text!r} with voice {voice.name}: {result.stderr.strip()}")
        wave, rate = soundfile.read(path, dtype="float64")
    finally:
        os.unlink(path)
    return resample(wave, rate, SAMPLE_RATE)


def spoken_words(text: str, voice: str = "kal16") -> list[str]:
    """The words flite says for `text` (its text normalisation, `-pw`), lowercase; "'s" stays apart.
    All the US voices share that normalisation; kal16, a diphone voice, synthesises fastest."""
    result = subprocess.run([FLITE, "-voice", voice, "-t", text, "-pw", "-o", "none"],
                            capture_output=True, text=True, timeout=FLITE_TIMEOUT_S)
    return result.stdout.split()
