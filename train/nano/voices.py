"""Synthetic voices for salmonn-nano's speech: flite, espeak-ng, festival and Piper, each at a chosen
speaking rate and pitch, returning 16 kHz float64 waveforms.

A voice is one engine's speaker (flite `slt`, espeak-ng accent `en-gb-scotland` with variant `f3`,
festival `ked_diphone`, Piper's neural `joe`). espeak-ng's accents and variants give many distinct (if
robotic) speakers; flite, festival and Piper the more natural ones, so a speaker is drawn engine first
(`ENGINE_WEIGHTS`), then among that engine's speakers. The engines are deterministic: the same voice,
settings and text give the same samples. Piper runs in its own environment (`piper_worker.py`).

Whole speakers are held out for the test split (`HELD_OUT_VOICES`): flite's rms, every voice of espeak-ng's
West Midlands accent, and espeak-ng's f4 and m6 variants in any accent.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from salmonn_cli.audio import resample
from salmonn_cli.errors import SalmonnError

SAMPLE_RATE = 16000
TIMEOUT_S = 120
ENGINE_PACKAGES = {"flite": "flite", "espeak": "espeak-ng", "festival": "festival festvox-kdlpc16k"}
ENGINE_COMMANDS = {"flite": "flite", "espeak": "espeak-ng", "festival": "festival"}
# Piper's environment, made by `make piper`; SALMONN_PIPER_PYTHON names another interpreter that has it
PIPER_PYTHON = Path(__file__).resolve().parents[2] / ".venv-piper" / "bin" / "python"
PIPER_WORKER = Path(__file__).resolve().with_name("piper_worker.py")
PIPER_VOICES = {"joe": "man"}
# share of the speech each engine speaks (renormalised over the engines a split has speakers of)
# (Piper, the most natural voice, is also the slowest: ~3x real time on one core against flite's ~50x)
ENGINE_WEIGHTS = {"flite": 0.32, "espeak": 0.4, "festival": 0.14, "piper": 0.14}

FLITE_VOICES = {"slt": "woman", "awb": "man", "kal16": "man", "kal": "man", "rms": "man"}
# median f0 of flite's voices (Hz, measured on one sentence): the pitch factor scales it
FLITE_F0 = {"slt": 178.0, "awb": 133.0, "kal16": 95.0, "kal": 95.0, "rms": 103.0}
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-029", "en-us-nyc",
                  "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = {"m1": "man", "m2": "man", "m3": "man", "m4": "man", "m5": "man", "m6": "man", "m7": "man",
                   "f1": "woman", "f2": "woman", "f3": "woman", "f4": "woman", "f5": "woman",
                   "klatt": "man", "klatt3": "man", "Annie": "woman", "Andy": "man", "grandma": "woman",
                   "grandpa": "man", "edward": "man", "belinda": "woman"}
ESPEAK_WPM = 165                # espeak-ng's default rate is 175 words a minute; a little slower is clearer
ESPEAK_PITCH = 50               # 0..99, espeak-ng's default
FESTIVAL_VOICES = {"ked_diphone": "man"}

HELD_OUT_ACCENT = "en-gb-x-gbcwmd"
HELD_OUT_VARIANTS = ("f4", "m6")


class VoiceError(SalmonnError):
    """A speech engine or voice is missing, or the engine failed."""


@dataclass(frozen=True)
class Voice:
    engine: str                 # "flite" | "espeak" | "festival" | "piper"
    name: str                   # flite voice, espeak "accent+variant", festival or piper voice
    rate: float = 1.0           # speaking rate: > 1 speaks faster
    pitch: float = 1.0          # pitch factor (festival keeps its own)

    @property
    def speaker(self) -> str:
        """The speaker's identity, whatever the rate and pitch."""
        return f"{self.engine}/{self.name}"

    @property
    def gender(self) -> str:
        if self.engine == "flite":
            return FLITE_VOICES[self.name]
        if self.engine == "espeak":
            return ESPEAK_VARIANTS[self.name.split("+")[1]]
        if self.engine == "piper":
            return PIPER_VOICES[self.name]
        return FESTIVAL_VOICES[self.name]

    def with_prosody(self, rate: float, pitch: float) -> "Voice":
        return Voice(self.engine, self.name, round(rate, 3), round(pitch, 3))


def all_speakers() -> list[Voice]:
    voices = [Voice("flite", name) for name in FLITE_VOICES]
    voices += [Voice("espeak", f"{accent}+{variant}") for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS]
    voices += [Voice("festival", name) for name in FESTIVAL_VOICES]
    voices += [Voice("piper", name) for name in PIPER_VOICES]
    return voices


def pick_speaker(speakers: list[Voice], rng: np.random.Generator) -> Voice:
    """An engine by `ENGINE_WEIGHTS` (among those in `speakers`), then one of its speakers."""
    engines = sorted({v.engine for v in speakers})
    weights = np.array([ENGINE_WEIGHTS[e] for e in engines])
    engine = engines[int(rng.choice(len(engines), p=weights / weights.sum()))]
    own = [v for v in speakers if v.engine == engine]
    return own[int(rng.integers(len(own)))]


def is_held_out(voice: Voice) -> bool:
    if voice.engine == "flite":
        return voice.name == "rms"
    if voice.engine == "espeak":
        accent, variant = voice.name.split("+")
        return accent == HELD_OUT_ACCENT or variant in HELD_OUT_VARIANTS
    return False


def train_speakers() -> list[Voice]:
    return [v for v in all_speakers() if not is_held_out(v)]


def held_out_speakers() -> list[Voice]:
    return [v for v in all_speakers() if is_held_out(v)]


def missing_engines() -> list[str]:
    missing = [ENGINE_PACKAGES[e] for e, cmd in ENGINE_COMMANDS.items() if shutil.which(cmd) is None]
    if shutil.which("festival") and not os.path.isdir("/usr/share/festival/voices/english/ked_diphone"):
        missing.append("festvox-kdlpc16k")
    return missing


def piper_python() -> Path | None:
    """The interpreter of Piper's environment, or None when `make piper` has not made it."""
    path = Path(os.environ.get("SALMONN_PIPER_PYTHON") or PIPER_PYTHON)
    return path if path.is_file() else None


def _read(path: str) -> np.ndarray:
    wave, rate = soundfile.read(path, dtype="float64", always_2d=True)
    return resample(wave.mean(axis=1), rate, SAMPLE_RATE)


def _run(args: list[str], what: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        raise VoiceError(f"{what} failed: {result.stderr.strip()[:300]}")


def _flite(text: str, voice: Voice, path: str) -> None:
    args = ["flite", "-voice", voice.name]
    if voice.rate != 1.0:
        args += ["--setf", f"duration_stretch={1 / voice.rate:.3f}"]
    if voice.pitch != 1.0:
        args += ["--setf", f"int_f0_target_mean={FLITE_F0[voice.name] * voice.pitch:.1f}"]
    _run(args + ["-t", text, "-o", path], f"flite ({voice.name})")


def _espeak(text: str, voice: Voice, path: str) -> None:
    pitch = int(np.clip(round(ESPEAK_PITCH * voice.pitch), 0, 99))
    _run(["espeak-ng", "-v", voice.name, "-s", str(round(ESPEAK_WPM * voice.rate)), "-p", str(pitch),
          "-w", path, "--", text], f"espeak-ng ({voice.name})")


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival(texts: list[str], voice: Voice, paths: list[str], folder: str) -> None:
    """One festival process for all the texts: its start-up costs more than a sentence."""
    lines = [f"(voice_{voice.name})", f"(Parameter.set 'Duration_Stretch {1 / voice.rate:.3f})"]
    lines += [f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(t)})) {_scheme_string(p)} 'riff)"
              for t, p in zip(texts, paths)]
    script = os.path.join(folder, "say.scm")
    with open(script, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _run(["festival", "-b", script], f"festival ({voice.name})")


class _PiperWorker:
    """One `piper_worker.py` process for this process's lifetime: Piper's model loads once."""

    process: subprocess.Popen | None = None

    @classmethod
    def say(cls, text: str, voice: Voice, path: str) -> None:
        if cls.process is None or cls.process.poll() is not None:
            python = piper_python()
            if python is None:
                raise VoiceError("Piper is not installed: run `make piper` (or set SALMONN_PIPER_PYTHON)")
            cls.process = subprocess.Popen([str(python), str(PIPER_WORKER)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            atexit.register(cls.process.kill)
        request = {"text": text, "length_scale": round(1 / voice.rate, 4), "out": path}
        cls.process.stdin.write(json.dumps(request) + "\n")
        cls.process.stdin.flush()
        answer = json.loads(cls.process.stdout.readline() or '{"error": "the Piper worker stopped"}')
        if "error" in answer:
            raise VoiceError(f"piper ({voice.name}) failed on {text!r}: {answer['error']}")


def synthesize_many(texts: list[str], voice: Voice) -> list[np.ndarray]:
    """Each text spoken by `voice`: float64 waveforms at 16 kHz."""
    with tempfile.TemporaryDirectory(prefix="nano-voice-") as folder:
        paths = [os.path.join(folder, f"{i}.wav") for i in range(len(texts))]
        if voice.engine == "festival":
            _festival(texts, voice, paths, folder)
        elif voice.engine == "piper":
            for text, path in zip(texts, paths):
                _PiperWorker.say(text, voice, path)
        else:
            say = _flite if voice.engine == "flite" else _espeak
            for text, path in zip(texts, paths):
                say(text, voice, path)
        waves = []
        for text, path in zip(texts, paths):
            if not os.path.isfile(path):
                raise VoiceError(f"{voice.speaker} wrote no audio for {text!r}")
            waves.append(_read(path))
    return waves


def synthesize(text: str, voice: Voice) -> np.ndarray:
    return synthesize_many([text], voice)[0]
