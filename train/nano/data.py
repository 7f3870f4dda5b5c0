"""The salmonn-nano data set: planned from a seed, rendered to 16 kHz WAV files, annotated in the
official format.

Kinds of clip, 1 s up to a whole 30 s chunk:
- speech: one or more sentences of open-vocabulary English (`text.py`) read by synthetic voices
  (`voices.py`; a conversation alternates two), with pauses between them;
- real: recordings of human speakers with a known text (`real_speech.py`), one or several in a row;
- mix: speech over a background sound at 5-20 dB SNR (the co-reasoning setting);
- event: one sound class alone (`sounds.py`: synthetic and real recordings, held-out recordings for test);
- quiet: silence, noise or hum, where nothing is said.
Speech clips are put through rooms, noise, a telephone line or a lossy codec (`augment.py`) at random.
Nothing said means nothing written: the transcript of an event or quiet clip is empty.

Three splits: train and valid use the training voices, speakers and text; test uses held-out voices
(`voices.is_held_out`), held-out real speakers and held-out text (`text.HELD_OUT_FORTUNES`).

Everything is a function of the seed: clip i of a split and kind draws from its own random generator,
so the files are identical whatever the number of worker processes.

Annotation entries carry, besides the official `path/text/task/Q`, the fields the evaluation uses:
`kind`, `voice` (speaker id), `event`, `snr_db`, `condition`, `seconds` and `metric` ("wer" for
transcripts, "event" for answers that must name the event class, "empty" for transcripts that must be
empty, "none" otherwise). Readers of the official format ignore them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

from salmonn_cli.errors import SalmonnError
from train.nano import augment, events, real_speech, sound_library, sounds, text, voices
from train.nano.voices import Voice

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
KINDS = ("speech", "real", "mix", "event", "quiet")
SPLIT_CODE = {"train": 1, "valid": 2, "test": 3}
KIND_CODE = {"speech": 1, "event": 2, "mix": 3, "real": 4, "quiet": 5}
AUDIO_DIR = "audio"
PROMPTS_FILE = "prompts.json"
SPEAKER_SEPARATOR = ", "                # between the speakers of a conversation in an entry's "voice"
SUMMARY_FILE = "dataset.json"

MAX_CLIP_SECONDS = 29.5                 # the last Whisper frames of a 30 s chunk stay free
MIN_CLIP_SECONDS = 1.0
SINGLE_SENTENCE_PROBABILITY = 0.35      # else a clip of several sentences, up to a whole chunk
LONG_CLIP_SECONDS = (4.0, MAX_CLIP_SECONDS)
QUICK_LONG_CLIP_SECONDS = (3.0, 8.0)    # the quick set's several-sentence clips: same code, less to synthesise
WORDS_PER_SECOND = 2.6                  # the voices' speed at rate 1, for planning a clip's length
CONVERSATION_PROBABILITY = 0.2          # a clip of several sentences alternates two voices
PAUSE_SECONDS = (0.15, 1.6)             # between sentences
EDGE_SECONDS = (0.05, 1.0)              # silence before the first and after the last sentence
REAL_PER_CLIP = (1, 6)                  # real recordings in a row (one speaker)
EVENT_SECONDS = (0.8, 8.0)
QUIET_SECONDS = (1.0, MAX_CLIP_SECONDS)
SPEECH_RMS_DBFS = (-30.0, -16.0)
EVENT_RMS_DBFS = (-34.0, -16.0)
MAX_PEAK = 0.95
MIX_SNR_DB = (5, 10, 15, 20)            # speech over a background event
PROSODY_PROBABILITY = 0.7               # vary rate / pitch this often
RATE_RANGE = (0.8, 1.25)
PITCH_RANGE = (0.85, 1.2)
# acoustic conditions, tried in this order, each with its probability (several may apply)
CONDITION_PROBABILITY = {"room": 0.3, "noise": 0.3, "telephone": 0.1, "codec": 0.1}
NOISE_SNR_DB = (5.0, 30.0)

PROMPTS = {
    "asr": [
        "<Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.",
        "<Speech><SpeechHere></Speech> Can you transcribe the speech into a written format?",
        "<Speech><SpeechHere></Speech> Listen to the speech and write down its content.",
        "<Speech><SpeechHere></Speech> What is the content of the speech you heard?",
        "<Speech><SpeechHere></Speech> Please transcribe the speech.",
        "<Speech><SpeechHere></Speech> Write down exactly what the speaker says.",
        # the plain questions a user types (README's first demo asks the first one): without them in
        # the asr pool the model took them for a caption request ("A man is speaking.")
        "<Speech><SpeechHere></Speech> What does the speaker say?",
        "<Speech><SpeechHere></Speech> What is the speaker saying?",
        "<Speech><SpeechHere></Speech> What is being said?",
        "<Speech><SpeechHere></Speech> Transcribe this recording.",
    ],
    "audiocaption": [
        "<Speech><SpeechHere></Speech> Please describe the audio.",
        "<Speech><SpeechHere></Speech> Listen to the audio and describe what you hear.",
        "<Speech><SpeechHere></Speech> Describe the sounds in this recording.",
        "<Speech><SpeechHere></Speech> Write a short caption for the audio.",
        "<Speech><SpeechHere></Speech> What can you hear in this audio clip?",
    ],
    "QA": ["<Speech><SpeechHere></Speech> {}"],
}

SPEECH_PRESENT_QUESTIONS = ("Is someone speaking?", "Is there speech in this recording?",
                            "Does anyone talk in this audio?", "Can you hear a person speaking?")
GENDER_QUESTIONS = ("Is the speaker a man or a woman?", "Is this a male or a female voice?",
                    "Who is speaking, a man or a woman?")
BACKGROUND_QUESTIONS = ("What sound is in the background?", "What can you hear behind the speaker?",
                        "Besides the voice, what else can you hear?", "What is the background noise?")
ANY_BACKGROUND_QUESTIONS = ("Is there any sound in the background?", "Can you hear anything besides the voice?")
SOURCE_QUESTIONS = ("What is making the sound?", "What is the source of this sound?",
                    "What do you think produced this sound?")
EVENT_WHAT_QUESTIONS = ("What sound do you hear?", "What is happening in this recording?", "What can you hear?")
YES_NO_QUESTIONS = ("Can you hear {}?", "Is there {} in this recording?")
WHAT_SAID_QUESTIONS = ("What does the speaker say?", "What are the words spoken in this audio?")
SPEAKER_CAPTIONS = ("{} is speaking.", "{} is talking.", "{} says something.")
QUIET_CAPTIONS = {"silence": ("Silence.", "Nothing can be heard."),
                  "noise": ("Only a steady background noise.", "A quiet noise, nobody speaks."),
                  "hum": ("A low electrical hum.", "A steady hum, nobody speaks.")}


class NanoDataError(SalmonnError):
    """The nano data cannot be made (missing tool, package or sound files, bad size)."""


@dataclass(frozen=True)
class Sizes:
    speech: int
    real: int
    mix: int
    event: int
    quiet: int

    def count(self, kind: str) -> int:
        return getattr(self, kind)

    def scaled(self, factor: float) -> "Sizes":
        return Sizes(*(max(1, round(getattr(self, k) * factor)) for k in KINDS))


# test.real is capped by the held-out recordings there are (one clip each)
FULL_SIZES = {"train": Sizes(speech=2600, real=600, mix=700, event=900, quiet=250),
              "valid": Sizes(speech=60, real=20, mix=20, event=30, quiet=10),
              "test": Sizes(speech=200, real=400, mix=60, event=150, quiet=60)}
QUICK_SIZES = {"train": Sizes(10, 4, 4, 6, 3), "valid": Sizes(2, 1, 1, 2, 1), "test": Sizes(3, 3, 2, 3, 2)}


@dataclass(frozen=True)
class Clip:
    split: str
    kind: str
    index: int
    seed: int
    sentences: tuple[str, ...] = ()
    voices: tuple[Voice, ...] = ()              # one per sentence
    recordings: tuple[str, ...] = ()            # real_speech ids (path) of a real clip
    event: str | None = None
    snr_db: int | None = None
    quiet: str | None = None                    # "silence" | "noise" | "hum"
    conditions: tuple[str, ...] = field(default=())

    @property
    def path(self) -> str:
        """Relative to the output folder (and so to the annotation files)."""
        return f"{AUDIO_DIR}/{self.split}/{self.kind}_{self.index:05d}.wav"

    def rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_CODE[self.split], KIND_CODE[self.kind], self.index, purpose])


@dataclass(frozen=True)
class Rendered:
    """What rendering decided: the length, and the sentences that fit in the chunk."""
    seconds: float
    transcript: str
    speakers: tuple[str, ...]
    genders: tuple[str, ...]


RENDER, ANNOTATE = 1, 2     # `Clip.rng` purposes


# --- plan ----------------------------------------------------------------------------------------

def _balanced_labels(count: int, classes: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    labels = [classes[i % len(classes)] for i in range(count)]
    return [labels[i] for i in rng.permutation(count)]


def _with_prosody(voice: Voice, rng: np.random.Generator) -> Voice:
    rate = float(rng.uniform(*RATE_RANGE)) if rng.random() < PROSODY_PROBABILITY else 1.0
    pitch = float(rng.uniform(*PITCH_RANGE)) if rng.random() < PROSODY_PROBABILITY else 1.0
    return voice.with_prosody(rate, pitch)


def _conditions(rng: np.random.Generator, split: str, kind: str) -> tuple[str, ...]:
    if kind in ("event", "quiet") or (split == "test" and rng.random() < 0.5):
        return ()           # half of the held-out speech stays clean, to tell the conditions' cost
    return tuple(c for c, p in CONDITION_PROBABILITY.items() if rng.random() < p)


class _SentenceDeck:
    """A split's sentences in a seeded order, dealt without repeats until the deck runs out."""

    def __init__(self, lines: list[text.Line], rng: np.random.Generator):
        self.lines = [lines[i].text for i in rng.permutation(len(lines))]
        self.next = 0

    def deal(self) -> str:
        if not self.lines:
            raise NanoDataError("no sentences for this split")
        line = self.lines[self.next % len(self.lines)]
        self.next += 1
        return line


def _plan_sentences(deck: _SentenceDeck, rng: np.random.Generator, long_seconds: tuple[float, float]) -> list[str]:
    if rng.random() < SINGLE_SENTENCE_PROBABILITY:
        return [deck.deal()]
    target = rng.uniform(*long_seconds)
    sentences, seconds = [], 0.0
    while not sentences or seconds < target:
        sentence = deck.deal()
        sentences.append(sentence)
        seconds += len(sentence.split()) / WORDS_PER_SECOND + np.mean(PAUSE_SECONDS)
    return sentences


def _plan_voices(count: int, speakers: list[Voice], rng: np.random.Generator) -> tuple[Voice, ...]:
    first = _with_prosody(voices.pick_speaker(speakers, rng), rng)
    if count == 1 or rng.random() >= CONVERSATION_PROBABILITY:
        return (first,) * count
    second = _with_prosody(voices.pick_speaker(speakers, rng), rng)
    return tuple(first if i % 2 == 0 else second for i in range(count))


def _plan_recordings(pool: list[real_speech.RealUtterance], split: str,
                     rng: np.random.Generator) -> tuple[str, ...]:
    if split == "test":
        return (pool[int(rng.integers(len(pool)))].path,)
    first = pool[int(rng.integers(len(pool)))]
    same_speaker = [u for u in pool if u.speaker == first.speaker]
    count = int(rng.integers(REAL_PER_CLIP[0], REAL_PER_CLIP[1] + 1))
    return (first.path,) + tuple(same_speaker[int(rng.integers(len(same_speaker)))].path for _ in range(count - 1))


def real_pool(split: str) -> list[real_speech.RealUtterance]:
    """The real recordings a split draws from: held-out speakers for test, the others for train and valid."""
    return real_speech.held_out_items() if split == "test" else real_speech.train_items()


@lru_cache(maxsize=1)
def _real_by_path() -> dict[str, real_speech.RealUtterance]:
    return {u.path: u for u in real_speech.catalog()}


def plan(seed: int, sizes: dict[str, Sizes], long_seconds: tuple[float, float] = LONG_CLIP_SECONDS
         ) -> dict[str, list[Clip]]:
    """Every clip of every split. Each split reads its own sentences (`text.Line.split`) and voices;
    the test split's real clips are its held-out recordings, each once."""
    clips: dict[str, list[Clip]] = {}
    for split in SPLITS:
        rng = np.random.default_rng([seed, SPLIT_CODE[split], 0])
        deck = _SentenceDeck(text.lines_for(split), rng)
        speakers = voices.held_out_speakers() if split == "test" else voices.train_speakers()
        recordings = real_pool(split)
        classes = sounds.split_classes(held_out=split == "test")
        split_clips = []
        for kind in KINDS:
            count = sizes[split].count(kind)
            if kind == "real" and split == "test":
                count = min(count, len(recordings))
            labels = _balanced_labels(count, classes, rng) if kind in ("mix", "event") else [None] * count
            for index in range(count):
                clip = Clip(split, kind, index, seed, event=labels[index])
                if kind in ("speech", "mix"):
                    sentences = _plan_sentences(deck, rng, long_seconds)
                    clip = replace(clip, sentences=tuple(sentences),
                                   voices=_plan_voices(len(sentences), speakers, rng))
                if kind == "real":
                    if split == "test":
                        clip = replace(clip, recordings=(recordings[index].path,))
                    else:
                        clip = replace(clip, recordings=_plan_recordings(recordings, split, rng))
                if kind == "mix":
                    clip = replace(clip, snr_db=MIX_SNR_DB[int(rng.integers(len(MIX_SNR_DB)))])
                if kind == "quiet":
                    clip = replace(clip, quiet=("silence", "noise", "hum")[int(rng.integers(3))])
                clip = replace(clip, conditions=_conditions(rng, split, kind))
                split_clips.append(clip)
        clips[split] = split_clips
    return clips


# --- audio ---------------------------------------------------------------------------------------

def active_rms(x: np.ndarray) -> float:
    """RMS over the 20 ms frames within 30 dB of the loudest one (ignores silence and gaps)."""
    frame = SAMPLE_RATE // 50
    n = max(len(x) // frame, 1)
    energy = (np.mean((x[: n * frame] ** 2).reshape(n, frame), axis=1) if len(x) >= frame
              else np.array([np.mean(x ** 2)]))
    if energy.max() <= 0:
        return 0.0
    return float(np.sqrt(energy[energy >= energy.max() * 1e-3].mean()))


def _set_rms(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = active_rms(x)
    return x * (10 ** (dbfs / 20) / rms) if rms > 0 else x


def _limit_peak(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max() if len(x) else 0.0
    return x * (MAX_PEAK / peak) if peak > MAX_PEAK else x


def _silence(rng: np.random.Generator, seconds_range: tuple[float, float]) -> np.ndarray:
    return np.zeros(int(rng.uniform(*seconds_range) * SAMPLE_RATE))


def _join(pieces: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Pieces with pauses between them and silence at both ends, as many as fit in the chunk;
    returns the audio and how many pieces it holds (at least one, cut if it alone is too long)."""
    out = [_silence(rng, EDGE_SECONDS)]
    total = len(out[0])
    limit = int(MAX_CLIP_SECONDS * SAMPLE_RATE)
    kept = 0
    for i, piece in enumerate(pieces):
        gap = _silence(rng, PAUSE_SECONDS) if i else np.zeros(0)
        if kept and total + len(gap) + len(piece) > limit:
            break
        out += [gap, piece]
        total += len(gap) + len(piece)
        kept += 1
    tail = _silence(rng, EDGE_SECONDS)
    wave = np.concatenate(out + [tail])[:limit]
    return wave, kept


def _speech_pieces(clip: Clip) -> list[np.ndarray]:
    """Each sentence spoken by its voice; one engine call per distinct voice."""
    waves: dict[int, np.ndarray] = {}
    for voice in dict.fromkeys(clip.voices):
        indices = [i for i, v in enumerate(clip.voices) if v == voice]
        for i, wave in zip(indices, voices.synthesize_many([clip.sentences[i] for i in indices], voice)):
            waves[i] = wave
    return [waves[i] for i in range(len(clip.sentences))]


def _apply_conditions(x: np.ndarray, clip: Clip, rng: np.random.Generator) -> np.ndarray:
    level = active_rms(x)
    for condition in clip.conditions:
        if condition == "room":
            x = augment.room(x, rng)
        elif condition == "noise":
            x = augment.noise(x, rng, rng.uniform(*NOISE_SNR_DB), level)
        elif condition == "telephone":
            x = augment.telephone(x, rng)
        elif condition == "codec":
            x = augment.lossy_codec(x, rng)
    return x


def _quiet(clip: Clip, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.uniform(*QUIET_SECONDS) * SAMPLE_RATE)
    if clip.quiet == "silence":
        return rng.standard_normal(n) * 10 ** (rng.uniform(-90, -70) / 20)
    if clip.quiet == "noise":
        return _set_rms(events.colored_noise(n, rng, float(rng.choice([0.0, 1.0, 2.0]))), rng.uniform(-60, -30))
    t = np.arange(n) / SAMPLE_RATE
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3)) for k in range(1, 6))
    return _set_rms(hum + 0.05 * events.colored_noise(n, rng, 1.0), rng.uniform(-50, -30))


def _event_alone(clip: Clip, rng: np.random.Generator) -> np.ndarray:
    length = rng.uniform(*EVENT_SECONDS)
    sound = sounds.render_sound(clip.event, length, rng, held_out=clip.split == "test")
    total = float(np.clip(length + rng.uniform(0.1, 1.5), MIN_CLIP_SECONDS, MAX_CLIP_SECONDS))
    offset = int(rng.uniform(0, max(total - length, 0.0)) * SAMPLE_RATE)
    wave = np.zeros(int(total * SAMPLE_RATE))
    wave[offset:offset + len(sound)] = sound[:len(wave) - offset]
    if rng.random() < 0.3:
        wave = augment.noise(wave, rng, rng.uniform(15, 40), active_rms(wave))
    return _set_rms(wave, rng.uniform(*EVENT_RMS_DBFS))


def _add_background(wave: np.ndarray, clip: Clip, rng: np.random.Generator) -> np.ndarray:
    seconds = len(wave) / SAMPLE_RATE
    length = seconds * rng.uniform(0.5, 1.0)
    background = sounds.render_sound(clip.event, length, rng, held_out=clip.split == "test")
    background *= active_rms(wave) / max(active_rms(background), 1e-12) * 10 ** (-clip.snr_db / 20)
    offset = int(rng.uniform(0, seconds - length) * SAMPLE_RATE)
    wave = wave.copy()
    wave[offset:offset + len(background)] += background[:len(wave) - offset]
    return wave


def render(clip: Clip) -> tuple[np.ndarray, Rendered]:
    """The clip's waveform (float64, 16 kHz) and what it holds, a function of the clip alone."""
    rng = clip.rng(RENDER)
    if clip.kind == "event":
        wave = _event_alone(clip, rng)
        return _limit_peak(wave), Rendered(len(wave) / SAMPLE_RATE, "", (), ())
    if clip.kind == "quiet":
        wave = _quiet(clip, rng)
        return _limit_peak(wave), Rendered(len(wave) / SAMPLE_RATE, "", (), ())
    if clip.kind == "real":
        utterances = [_real_by_path()[p] for p in clip.recordings]
        wave, kept = _join([real_speech.load(u) for u in utterances], rng)
        said = utterances[:kept]
        transcript = " ".join(u.text for u in said)
        speakers = tuple(dict.fromkeys(u.speaker for u in said))
        genders = ()
    else:
        wave, kept = _join(_speech_pieces(clip), rng)
        transcript = " ".join(clip.sentences[:kept])
        speakers = tuple(dict.fromkeys(v.speaker for v in clip.voices[:kept]))
        genders = tuple(dict.fromkeys(v.gender for v in clip.voices[:kept]))
    wave = _set_rms(wave, rng.uniform(*SPEECH_RMS_DBFS))
    if clip.kind == "mix":
        wave = _add_background(wave, clip, rng)
    wave = _apply_conditions(wave, clip, rng)
    return _limit_peak(wave), Rendered(len(wave) / SAMPLE_RATE, transcript, speakers, genders)


def write_clip(clip: Clip, out_dir: Path) -> Rendered:
    """Render and write one clip."""
    wave, rendered = render(clip)
    soundfile.write(str(out_dir / clip.path), wave, SAMPLE_RATE, subtype="PCM_16")
    return rendered


def _write_clip_task(args: tuple[Clip, str]) -> Rendered:
    return write_clip(args[0], Path(args[1]))


# --- annotations ---------------------------------------------------------------------------------

def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _speaker_phrase(rendered: Rendered) -> str | None:
    if len(rendered.genders) != 1:
        return None
    return "A woman" if rendered.genders[0] == "woman" else "A man"


def _entry(clip: Clip, rendered: Rendered, task: str, answer: str, question: str = "",
           metric: str = "none") -> dict:
    entry = {"path": clip.path, "text": answer, "task": task, "Q": question, "kind": clip.kind,
             "seconds": round(rendered.seconds, 3)}
    if rendered.speakers:
        entry["voice"] = SPEAKER_SEPARATOR.join(rendered.speakers)
    if clip.event is not None:
        entry["event"] = clip.event
    if clip.snr_db is not None:
        entry["snr_db"] = clip.snr_db
    if clip.conditions:
        entry["condition"] = "+".join(clip.conditions)
    entry["metric"] = metric
    return entry


def _yes_no_event(clip: Clip, rendered: Rendered, rng: np.random.Generator) -> dict:
    asked = clip.event if rng.random() < 0.5 else _pick([n for n in sounds.CLASS_NAMES if n != clip.event], rng)
    question = _pick(YES_NO_QUESTIONS, rng).format(sounds.BY_NAME[asked].noun)
    return _entry(clip, rendered, "QA", "Yes." if asked == clip.event else "No.", question)


def _speech_extras(clip: Clip, rendered: Rendered, rng: np.random.Generator) -> list[dict]:
    entries = []
    speaker = _speaker_phrase(rendered)
    if rng.random() < 0.2:
        entries.append(_entry(clip, rendered, "QA", "Yes, someone is speaking.", _pick(SPEECH_PRESENT_QUESTIONS, rng)))
    if speaker and rng.random() < 0.15:
        entries.append(_entry(clip, rendered, "QA", f"{speaker}.", _pick(GENDER_QUESTIONS, rng)))
    if speaker and clip.kind == "speech" and rng.random() < 0.1:
        entries.append(_entry(clip, rendered, "audiocaption", _pick(SPEAKER_CAPTIONS, rng).format(speaker)))
    if clip.kind == "speech" and rng.random() < 0.1:
        entries.append(_entry(clip, rendered, "QA", "No, there is only speech.", _pick(ANY_BACKGROUND_QUESTIONS, rng)))
    if rng.random() < 0.1:
        entries.append(_entry(clip, rendered, "QA", rendered.transcript, _pick(WHAT_SAID_QUESTIONS, rng), "wer"))
    return entries


def _event_entries(clip: Clip, rendered: Rendered, rng: np.random.Generator) -> list[dict]:
    cls = sounds.BY_NAME[clip.event]
    entries = [_entry(clip, rendered, "audiocaption", _pick(cls.captions, rng), metric="event")]
    if clip.split == "test":
        return entries + [_entry(clip, rendered, "QA", cls.source, _pick(SOURCE_QUESTIONS, rng), "event"),
                          _entry(clip, rendered, "asr", "", metric="empty")]
    choice = int(rng.integers(5))
    if choice == 0:
        entries.append(_entry(clip, rendered, "QA", cls.source, _pick(SOURCE_QUESTIONS, rng), "event"))
    elif choice == 1:
        entries.append(_entry(clip, rendered, "QA", _pick(cls.captions, rng), _pick(EVENT_WHAT_QUESTIONS, rng), "event"))
    elif choice == 2:
        entries.append(_yes_no_event(clip, rendered, rng))
    elif choice == 3:
        entries.append(_entry(clip, rendered, "QA", "No, nobody is speaking.", _pick(SPEECH_PRESENT_QUESTIONS, rng)))
    if rng.random() < 0.35:
        entries.append(_entry(clip, rendered, "asr", "", metric="empty"))
    return entries


def _mix_entries(clip: Clip, rendered: Rendered, rng: np.random.Generator) -> list[dict]:
    cls = sounds.BY_NAME[clip.event]
    asr = _entry(clip, rendered, "asr", rendered.transcript, metric="wer")
    background = _entry(clip, rendered, "QA", _pick(cls.captions, rng), _pick(BACKGROUND_QUESTIONS, rng), "event")
    if clip.split == "test":
        return [asr, background]
    entries = [asr] if rng.random() < 0.8 else []
    speaker = _speaker_phrase(rendered)
    if speaker and rng.random() < 0.3:
        entries.append(_entry(clip, rendered, "audiocaption", f"{speaker} is speaking while {cls.background}.",
                              metric="event"))
    choice = int(rng.integers(4))
    if choice <= 1 or not entries:
        entries.append(background)
    elif choice == 2:
        caption = _pick(cls.captions, rng)
        entries.append(_entry(clip, rendered, "QA", f"Yes, {caption[0].lower()}{caption[1:]}",
                              _pick(ANY_BACKGROUND_QUESTIONS, rng), "event"))
    else:
        entries.append(_yes_no_event(clip, rendered, rng))
    return entries


def _quiet_entries(clip: Clip, rendered: Rendered, rng: np.random.Generator) -> list[dict]:
    entries = [_entry(clip, rendered, "asr", "", metric="empty")]
    if clip.split != "test":
        if rng.random() < 0.4:
            entries.append(_entry(clip, rendered, "audiocaption", _pick(QUIET_CAPTIONS[clip.quiet], rng)))
        if rng.random() < 0.3:
            entries.append(_entry(clip, rendered, "QA", "No, nobody is speaking.", _pick(SPEECH_PRESENT_QUESTIONS, rng)))
    return entries


def annotate(clip: Clip, rendered: Rendered) -> list[dict]:
    """The annotation entries of one clip: fixed tasks on the test split (transcripts, event names,
    empty transcripts where nothing is said), a seeded mix of tasks elsewhere."""
    rng = clip.rng(ANNOTATE)
    if clip.kind == "event":
        return _event_entries(clip, rendered, rng)
    if clip.kind == "quiet":
        return _quiet_entries(clip, rendered, rng)
    if clip.kind == "mix":
        return _mix_entries(clip, rendered, rng)
    entries = [_entry(clip, rendered, "asr", rendered.transcript, metric="wer")]
    if clip.split != "test":
        entries += _speech_extras(clip, rendered, rng)
    return entries


# --- the whole set -------------------------------------------------------------------------------

def check_prerequisites(quick: bool = False) -> None:
    """The full set also needs the sound library's packages (the quick one makes do with what is there)."""
    missing = voices.missing_engines() + text.missing_packages() + real_speech.missing_packages()
    missing += [events.FREEDESKTOP_PACKAGE] if events.missing_sound_files() else []
    missing += [] if quick else sound_library.missing_packages()
    if missing:
        raise NanoDataError(f"the nano data needs Debian packages: apt-get install {' '.join(dict.fromkeys(missing))}")
    if voices.piper_python() is None:
        raise NanoDataError("the nano data needs Piper's environment: run `make piper`")


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def make_dataset(out_dir: str | Path, seed: int = 0, quick: bool = False, scale: float = 1.0,
                 jobs: int | None = None) -> dict:
    """Write `{train,valid,test}.json`, `prompts.json`, `dataset.json` (a summary, returned) and the
    WAV files under `audio/` into `out_dir`."""
    if scale <= 0:
        raise NanoDataError(f"--scale must be positive, got {scale}")
    check_prerequisites(quick)
    out_dir = Path(out_dir)
    sizes = QUICK_SIZES if quick else {s: n.scaled(scale) for s, n in FULL_SIZES.items()}
    clips = plan(seed, sizes, QUICK_LONG_CLIP_SECONDS if quick else LONG_CLIP_SECONDS)
    for split in SPLITS:
        (out_dir / AUDIO_DIR / split).mkdir(parents=True, exist_ok=True)

    everything = [c for split in SPLITS for c in clips[split]]
    jobs = max(1, jobs or os.cpu_count() or 1)
    tasks = [(c, str(out_dir)) for c in everything]
    if jobs == 1:
        results = list(map(_write_clip_task, tasks))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_write_clip_task, tasks, chunksize=4))
    rendered = dict(zip((c.path for c in everything), results))

    summary = {"seed": seed, "quick": quick, "scale": scale, "sample_rate": SAMPLE_RATE,
               "train_voices": [v.speaker for v in voices.train_speakers()],
               "held_out_voices": [v.speaker for v in voices.held_out_speakers()],
               "held_out_real_speakers": list(real_speech.HELD_OUT_SPEAKERS),
               "event_classes": list(sounds.split_classes(held_out=False)),
               "held_out_event_classes": list(sounds.split_classes(held_out=True)), "text": text.summary(), "splits": {}}
    for split in SPLITS:
        entries = [e for clip in clips[split] for e in annotate(clip, rendered[clip.path])]
        _dump_json(out_dir / f"{split}.json", {"annotation": entries})
        tasks_count: dict[str, int] = {}
        for e in entries:
            tasks_count[e["task"]] = tasks_count.get(e["task"], 0) + 1
        lengths = [rendered[c.path].seconds for c in clips[split]]
        summary["splits"][split] = {
            "clips": {k: sum(c.kind == k for c in clips[split]) for k in KINDS},
            "entries": len(entries), "tasks": tasks_count,
            "hours": round(sum(lengths) / 3600, 3), "max_clip_seconds": round(max(lengths), 3),
            "speakers": len({s for c in clips[split] for s in rendered[c.path].speakers}),
        }
    _dump_json(out_dir / PROMPTS_FILE, PROMPTS)
    _dump_json(out_dir / SUMMARY_FILE, summary)
    return summary
