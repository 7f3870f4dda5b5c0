"""The sound-event classes of salmonn-nano and a renderer for each: freedesktop theme sounds
(Debian `sound-theme-freedesktop`) varied in speed and repetition, and synthetic sounds drawn from
a random generator. Every renderer returns exactly the number of samples asked for, at 16 kHz.

Each class has short human descriptions (captions, the clause used behind speech, the answer to
"What is making the sound?", the noun phrase for yes/no questions) and the keywords that the
evaluation looks for in an answer. Keywords of different classes never occur in another class's
descriptions (tests check this).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile

from salmonn_cli.audio import resample

SAMPLE_RATE = 16000
FREEDESKTOP_DIR = Path("/usr/share/sounds/freedesktop/stereo")
FREEDESKTOP_PACKAGE = "sound-theme-freedesktop"
# alarm-clock-elapsed beeps at 8.19 kHz, above 16 kHz audio's Nyquist: it is slowed down (and so
# pitched down) by this factor range before use
ALARM_SLOWDOWN = (2.0, 2.6)
SPEED_RANGE = (0.88, 1.12)      # speed factor applied to theme sounds (changes pitch too)


@dataclass(frozen=True)
class EventClass:
    name: str
    captions: tuple[str, ...]       # answers to "describe the audio"
    background: str                 # "... while {background}." behind speech
    source: str                     # answer to "What is making the sound?"
    noun: str                       # "Can you hear {noun}?"
    keywords: tuple[str, ...]       # an answer naming the class contains one of these (word starts)
    files: tuple[str, ...] = ()     # freedesktop sounds used for this class


EVENT_CLASSES: tuple[EventClass, ...] = (
    EventClass("phone", ("A phone is ringing.", "A telephone rings.", "The phone is ringing."),
               "a phone rings in the background", "A telephone.", "a phone ringing",
               ("phone", "telephone"), ("phone-incoming-call.oga",)),
    EventClass("bell", ("A bell rings.", "A bell is ringing.", "Someone strikes a bell."),
               "a bell rings in the background", "A bell.", "a bell",
               ("bell", "chime", "ding"), ("bell.oga", "complete.oga")),
    EventClass("beeping", ("An alarm is beeping.", "Electronic beeps sound.", "Something is beeping."),
               "an alarm beeps in the background", "An electronic alarm beeping.", "beeping",
               ("beep", "alarm"), ("alarm-clock-elapsed.oga",)),
    EventClass("camera", ("A camera shutter clicks.", "Someone takes a photo with a camera."),
               "a camera shutter clicks in the background", "A camera.", "a camera shutter",
               ("camera", "shutter"), ("camera-shutter.oga",)),
    EventClass("paper", ("Someone is crumpling paper.", "Paper is being crumpled.", "Paper rustles."),
               "someone crumples paper in the background", "Crumpled paper.", "paper being crumpled",
               ("paper", "crumpl", "crinkl", "rustl"), ("trash-empty.oga",)),
    EventClass("siren", ("A siren is wailing.", "A siren sounds.", "An emergency siren wails."),
               "a siren wails in the background", "A siren.", "a siren", ("siren",)),
    EventClass("hiss", ("A steady hissing noise.", "There is a loud static hiss.", "White noise hisses."),
               "static hisses in the background", "Static noise.", "a hissing noise",
               ("hiss", "static", "white noise")),
    EventClass("rumble", ("A low rumbling noise.", "A deep rumble.", "Something rumbles in the distance."),
               "a low rumble fills the background", "A low rumbling.", "a rumbling noise", ("rumbl",)),
    EventClass("knock", ("Someone is knocking on a door.", "There is a knock at the door.",
                         "Someone knocks on the door."),
               "someone knocks on a door in the background", "Someone knocking on a door.", "knocking",
               ("knock",)),
    EventClass("ticking", ("A clock is ticking.", "A clock ticks steadily.", "Steady ticking of a clock."),
               "a clock ticks in the background", "A ticking clock.", "a clock ticking", ("tick",)),
    EventClass("music", ("Music is playing.", "A short melody is played.", "Someone plays a tune."),
               "music plays in the background", "Music.", "music", ("music", "melody", "tune")),
)
EVENT_NAMES = tuple(c.name for c in EVENT_CLASSES)
EVENTS_BY_NAME = {c.name: c for c in EVENT_CLASSES}


def missing_sound_files() -> list[str]:
    return sorted({f for c in EVENT_CLASSES for f in c.files if not (FREEDESKTOP_DIR / f).is_file()})


# --- helpers -------------------------------------------------------------------------------------

def _seconds(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLE_RATE


def _fade(x: np.ndarray, seconds: float) -> np.ndarray:
    n = min(int(seconds * SAMPLE_RATE), len(x) // 2)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _normalize_peak(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max()
    return x / peak if peak > 0 else x


def _place(n: int, pieces: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Sum pieces at their sample offsets into n samples (pieces are cut at the end)."""
    out = np.zeros(n)
    for start, piece in pieces:
        if start < n:
            m = min(len(piece), n - start)
            out[start:start + m] += piece[:m]
    return out


def _repeat(n: int, make: Callable[[], np.ndarray], gap: Callable[[], float], rng: np.random.Generator,
            max_start: float = 0.3) -> np.ndarray:
    """Copies of `make()` one after another with `gap()` seconds between them, filling n samples."""
    pieces, t = [], int(rng.uniform(0, max_start) * SAMPLE_RATE)
    while t < n:
        piece = make()
        pieces.append((t, piece))
        t += len(piece) + int(gap() * SAMPLE_RATE)
    return _place(n, pieces)


def colored_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown), unit peak."""
    size = 1 << max(n - 1, 1).bit_length()      # a power of two: FFTs of long prime-ish lengths are slow
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    spectrum *= (freqs / 20.0).clip(1.0) ** (-exponent / 2)   # flat below 20 Hz: no DC drift
    spectrum[0] = 0
    return _normalize_peak(np.fft.irfft(spectrum, size)[:n])


@lru_cache(maxsize=None)
def _theme_sound(name: str) -> tuple[np.ndarray, int]:
    data, rate = soundfile.read(str(FREEDESKTOP_DIR / name), dtype="float64", always_2d=True)
    return data.mean(axis=1), rate


def theme_sound(name: str, speed: float) -> np.ndarray:
    """A freedesktop sound at 16 kHz, played `speed` times faster (higher) or slower (lower)."""
    wave, rate = _theme_sound(name)
    return _normalize_peak(resample(wave, rate, int(round(SAMPLE_RATE / speed))))


# --- renderers -----------------------------------------------------------------------------------

def _from_theme(name: str, n: int, rng: np.random.Generator, gap: tuple[float, float],
                speed: tuple[float, float] = SPEED_RANGE) -> np.ndarray:
    """Repeated (or, if long, cropped) copies of one theme sound at one random speed."""
    wave = theme_sound(name, rng.uniform(*speed))
    if len(wave) >= n:
        start = int(rng.integers(len(wave) - n + 1))
        return _fade(wave[start:start + n], 0.01)
    return _repeat(n, lambda: wave, lambda: rng.uniform(*gap), rng)


def _phone_trill(n: int, rng: np.random.Generator) -> np.ndarray:
    f1 = rng.uniform(850, 1300)
    f2 = f1 * rng.uniform(1.15, 1.3)
    rate = rng.uniform(12, 25)

    def burst():
        t = _seconds(int(rng.uniform(0.8, 1.6) * SAMPLE_RATE))
        f = np.where(np.sin(2 * np.pi * rate * t) >= 0, f1, f2)
        phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        return _fade(np.sin(phase) + 0.25 * np.sin(3 * phase), 0.01)

    return _repeat(n, burst, lambda: rng.uniform(0.4, 1.0), rng)


def render_phone(n: int, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.6:
        return _from_theme("phone-incoming-call.oga", n, rng, (0.2, 0.8))
    return _phone_trill(n, rng)


BELL_PARTIALS = (0.5, 1.0, 1.19, 1.5, 2.0, 2.5, 2.66, 3.01)     # church-bell partial ratios


def _bell_strike(rng: np.random.Generator) -> np.ndarray:
    f0 = rng.uniform(350, 1400)
    tau = rng.uniform(0.4, 1.6)
    t = _seconds(int(min(4 * tau, 3.0) * SAMPLE_RATE))
    out = np.zeros_like(t)
    for ratio in BELL_PARTIALS:
        if f0 * ratio < 7500:
            out += rng.uniform(0.2, 1.0) * np.exp(-t / (tau / ratio ** 0.5)) * np.sin(
                2 * np.pi * f0 * ratio * t + rng.uniform(0, 2 * np.pi))
    return _normalize_peak(out)


def render_bell(n: int, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return _from_theme(("bell.oga", "complete.oga")[int(rng.integers(2))], n, rng, (0.3, 1.0))
    return _repeat(n, lambda: _bell_strike(rng), lambda: rng.uniform(-0.3, 0.8), rng)


def _beep_group(rng: np.random.Generator, freq: float, count: int, length: float, gap: float) -> np.ndarray:
    t = _seconds(int(length * SAMPLE_RATE))
    tone = _fade(np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(6 * np.pi * freq * t), 0.003)
    silence = np.zeros(int(gap * SAMPLE_RATE))
    return np.concatenate([np.concatenate([tone, silence]) for _ in range(count)])


def render_beeping(n: int, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.35:
        return _from_theme("alarm-clock-elapsed.oga", n, rng, (0.2, 0.6), speed=(1 / ALARM_SLOWDOWN[1],
                                                                                  1 / ALARM_SLOWDOWN[0]))
    freq = rng.uniform(1200, 4000)
    count = int(rng.integers(1, 5))
    length, gap = rng.uniform(0.05, 0.18), rng.uniform(0.05, 0.12)
    pause = rng.uniform(0.2, 0.8)
    return _repeat(n, lambda: _beep_group(rng, freq, count, length, gap), lambda: pause, rng)


def render_camera(n: int, rng: np.random.Generator) -> np.ndarray:
    return _from_theme("camera-shutter.oga", n, rng, (0.2, 1.0))


def _crumple(rng: np.random.Generator) -> np.ndarray:
    """Dense random crackles (short decaying high-passed noise bursts) under a swelling envelope."""
    m = int(rng.uniform(0.5, 1.8) * SAMPLE_RATE)
    out = np.zeros(m)
    rate = rng.uniform(40, 160)
    for _ in range(int(rate * m / SAMPLE_RATE)):
        k = int(rng.uniform(0.001, 0.008) * SAMPLE_RATE)
        start = int(rng.integers(max(m - k, 1)))
        burst = np.diff(rng.standard_normal(k + 1)) * np.exp(-np.arange(k) / (k / 3))
        out[start:start + k] += rng.lognormal(0, 0.7) * burst
    return _normalize_peak(out * np.sin(np.pi * np.arange(m) / m) ** 0.5)


def render_paper(n: int, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return _from_theme("trash-empty.oga", n, rng, (0.1, 0.6))
    return _repeat(n, lambda: _crumple(rng), lambda: rng.uniform(0.0, 0.5), rng)


def render_siren(n: int, rng: np.random.Generator) -> np.ndarray:
    t = _seconds(n)
    kind = int(rng.integers(3))
    if kind == 0:           # wail: slow sweep up and down
        freq = rng.uniform(650, 1100) + rng.uniform(250, 450) * np.sin(2 * np.pi * t / rng.uniform(1.5, 4.0))
    elif kind == 1:         # hi-lo: two alternating tones
        low = rng.uniform(450, 700)
        freq = np.where(np.sin(np.pi * t / rng.uniform(0.4, 0.7)) >= 0, low, low * rng.uniform(1.25, 1.45))
    else:                   # yelp: fast rising sweeps
        period = rng.uniform(0.15, 0.35)
        freq = rng.uniform(600, 900) + rng.uniform(500, 900) * ((t / period) % 1.0)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return _fade(np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase), 0.05)


def render_hiss(n: int, rng: np.random.Generator) -> np.ndarray:
    return _fade(colored_noise(n, rng, rng.choice([0.0, 0.5, 1.0])), rng.uniform(0.02, 0.3))


def render_rumble(n: int, rng: np.random.Generator) -> np.ndarray:
    noise = colored_noise(n, rng, 2.0)
    spectrum = np.fft.rfft(noise)
    cutoff = rng.uniform(150, 400)
    spectrum[np.fft.rfftfreq(n, 1 / SAMPLE_RATE) > cutoff] = 0
    swell = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * _seconds(n) + rng.uniform(0, 2 * np.pi))
    return _fade(_normalize_peak(np.fft.irfft(spectrum, n) * swell), rng.uniform(0.05, 0.4))


def _knock(rng: np.random.Generator, freq: float) -> np.ndarray:
    t = _seconds(int(0.12 * SAMPLE_RATE))
    body = np.exp(-t / rng.uniform(0.015, 0.04)) * np.sin(2 * np.pi * freq * rng.uniform(0.95, 1.05) * t)
    click = np.zeros_like(t)
    k = int(0.004 * SAMPLE_RATE)
    click[:k] = rng.standard_normal(k) * np.exp(-np.arange(k) / (k / 4))
    return body + rng.uniform(0.2, 0.6) * click


def render_knock(n: int, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(120, 400)

    def group():
        count = int(rng.integers(2, 5))
        spacing = rng.uniform(0.12, 0.25)
        return _place(int((count * spacing + 0.15) * SAMPLE_RATE),
                      [(int(i * spacing * SAMPLE_RATE), _knock(rng, freq)) for i in range(count)])

    return _repeat(n, group, lambda: rng.uniform(0.5, 1.5), rng)


def render_ticking(n: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(0.45, 1.0)
    freqs = (rng.uniform(2000, 5000), rng.uniform(2000, 5000))     # tick and tock
    tau = rng.uniform(0.001, 0.003)
    t = _seconds(int(0.02 * SAMPLE_RATE))
    clicks = [np.exp(-t / tau) * np.sin(2 * np.pi * f * t) for f in freqs]
    start = int(rng.uniform(0, period) * SAMPLE_RATE)
    count = max(1, (n - start) // int(period * SAMPLE_RATE) + 1)
    return _place(n, [(start + int(i * period * SAMPLE_RATE), clicks[i % 2]) for i in range(count)])


MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
PENTATONIC_SCALE = (0, 2, 4, 7, 9)


def _note(freq: float, seconds: float, decay: float | None) -> np.ndarray:
    t = _seconds(int(seconds * SAMPLE_RATE))
    harmonics = sum(a * np.sin(2 * np.pi * freq * h * t) for h, a in ((1, 1.0), (2, 0.5), (3, 0.3), (4, 0.15))
                    if freq * h < 7500)
    envelope = np.exp(-t / decay) if decay else np.ones_like(t)
    return _fade(harmonics * envelope, 0.005)


def render_music(n: int, rng: np.random.Generator) -> np.ndarray:
    scale = (MAJOR_SCALE, PENTATONIC_SCALE)[int(rng.integers(2))]
    root = rng.uniform(52, 70)                      # MIDI note number of the tonic
    beat = rng.uniform(0.15, 0.45)
    decay = rng.uniform(0.15, 0.8) if rng.random() < 0.7 else None
    with_bass = rng.random() < 0.5
    degree, t, pieces = int(rng.integers(len(scale))), 0, []
    while t < n:
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, 2 * len(scale) - 1))
        midi = root + 12 * (degree // len(scale)) + scale[degree % len(scale)]
        length = beat * rng.choice([1, 1, 1, 2])
        pieces.append((t, _note(440 * 2 ** ((midi - 69) / 12), length, decay)))
        if with_bass and len(pieces) % 4 == 1:
            pieces.append((t, 0.6 * _note(440 * 2 ** ((root - 12 - 69) / 12), 4 * beat, decay)))
        t += int(length * SAMPLE_RATE)
    return _fade(_place(n, pieces), 0.02)


RENDERERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "phone": render_phone, "bell": render_bell, "beeping": render_beeping, "camera": render_camera,
    "paper": render_paper, "siren": render_siren, "hiss": render_hiss, "rumble": render_rumble,
    "knock": render_knock, "ticking": render_ticking, "music": render_music,
}


def render_event(name: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """`seconds` of the event class `name` (float64, unit peak, 16 kHz)."""
    n = int(round(seconds * SAMPLE_RATE))
    return _normalize_peak(RENDERERS[name](n, rng)[:n])
