"""The salmonn-nano data set: planned from a seed, rendered to 16 kHz WAV files, annotated in the
official format.

Three kinds of clip (1-6 s): speech (a flite voice saying a generated sentence), event (one sound
class, time-shifted, with random gain and sometimes a little background noise) and mix (speech over a
background event at 5-20 dB SNR: the co-reasoning setting). Three splits:
- train / valid: the training voices (pitch and speed varied), disjoint sentence sets;
- test: the held-out voice (`speech.HELD_OUT_VOICE`, default settings) saying held-out sentences that
  appear in no other split, plus fresh event renderings.

Everything is a function of the seed: clip i of a split and kind draws from its own random generator,
so the files are identical whatever the number of worker processes.

Annotation entries carry, besides the official `path/text/task/Q`, the fields the evaluation uses:
`kind`, `voice`, `event`, `snr_db` and `metric` ("wer" for transcripts, "event" for answers that must
name the event class, "none" otherwise). Readers of the official format ignore them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile

from salmonn_cli.errors import SalmonnError
from train.nano import events, speech
from train.nano.events import EVENT_NAMES, EVENTS_BY_NAME, render_event
from train.nano.sentences import Sentence, generate_sentences
from train.nano.speech import Voice

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
KINDS = ("speech", "event", "mix")
SPLIT_CODE = {"train": 1, "valid": 2, "test": 3}
KIND_CODE = {"speech": 1, "event": 2, "mix": 3}
AUDIO_DIR = "audio"
PROMPTS_FILE = "prompts.json"
SUMMARY_FILE = "dataset.json"

MAX_CLIP_SECONDS = 6.0
MIN_CLIP_SECONDS = 1.0
EVENT_SECONDS = (0.8, 4.5)
SPEECH_PAD_SECONDS = (0.05, 0.6)        # silence before and after the sentence
SPEECH_RMS_DBFS = (-28.0, -16.0)
EVENT_RMS_DBFS = (-32.0, -16.0)
MAX_PEAK = 0.95
MIX_SNR_DB = (5, 10, 15, 20)            # speech over background event
NOISE_SNR_DB = (20.0, 40.0)             # light background noise augmentation
NOISE_PROBABILITY = {"speech": 0.3, "event": 0.4, "mix": 0.0}
PROSODY_PROBABILITY = 0.7               # training voices: vary speed / pitch this often
STRETCH_RANGE = (0.85, 1.2)
F0_FACTOR_RANGE = (0.85, 1.2)

PROMPTS = {
    "asr": [
        "<Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.",
        "<Speech><SpeechHere></Speech> Can you transcribe the speech into a written format?",
        "<Speech><SpeechHere></Speech> Listen to the speech and write down its content.",
        "<Speech><SpeechHere></Speech> What is the content of the speech you heard?",
        "<Speech><SpeechHere></Speech> Please transcribe the speech.",
        "<Speech><SpeechHere></Speech> Write down exactly what the speaker says.",
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
TOPIC_QUESTIONS = ("What is the speaker talking about?", "What is the topic of the speech?",
                   "What is this person talking about?")
BACKGROUND_QUESTIONS = ("What sound is in the background?", "What can you hear behind the speaker?",
                        "Besides the voice, what else can you hear?", "What is the background noise?")
ANY_BACKGROUND_QUESTIONS = ("Is there any sound in the background?", "Can you hear anything besides the voice?")
SOURCE_QUESTIONS = ("What is making the sound?", "What is the source of this sound?",
                    "What do you think produced this sound?")
EVENT_WHAT_QUESTIONS = ("What sound do you hear?", "What is happening in this recording?", "What can you hear?")
YES_NO_QUESTIONS = ("Can you hear {}?", "Is there {} in this recording?")
WHAT_SAID_QUESTIONS = ("What does the speaker say?", "What are the words spoken in this audio?")
SPEAKER_CAPTIONS = ("{} is speaking.", "{} is talking.", "{} says a short sentence.")


class NanoDataError(SalmonnError):
    """The nano data cannot be made (missing tool or sound files, bad size)."""


@dataclass(frozen=True)
class Sizes:
    speech: int
    event: int
    mix: int

    def count(self, kind: str) -> int:
        return getattr(self, kind)

    def scaled(self, factor: float) -> "Sizes":
        return Sizes(*(max(1, round(n * factor)) for n in (self.speech, self.event, self.mix)))


FULL_SIZES = {"train": Sizes(1800, 1100, 770), "valid": Sizes(60, 55, 33), "test": Sizes(200, 220, 110)}
QUICK_SIZES = {"train": Sizes(14, 14, 8), "valid": Sizes(3, 3, 2), "test": Sizes(4, 4, 2)}


@dataclass(frozen=True)
class Clip:
    split: str
    kind: str
    index: int
    seed: int
    sentence: Sentence | None = None
    voice: Voice | None = None
    event: str | None = None
    snr_db: int | None = None

    @property
    def path(self) -> str:
        """Relative to the output folder (and so to the annotation files)."""
        return f"{AUDIO_DIR}/{self.split}/{self.kind}_{self.index:05d}.wav"

    def rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_CODE[self.split], KIND_CODE[self.kind], self.index, purpose])


RENDER, ANNOTATE = 1, 2     # `Clip.rng` purposes


# --- plan ----------------------------------------------------------------------------------------

def _balanced_labels(count: int, rng: np.random.Generator) -> list[str]:
    labels = [EVENT_NAMES[i % len(EVENT_NAMES)] for i in range(count)]
    return [labels[i] for i in rng.permutation(count)]


def _train_voice(rng: np.random.Generator) -> Voice:
    name = speech.TRAIN_VOICES[int(rng.choice(len(speech.TRAIN_VOICES), p=speech.TRAIN_VOICE_WEIGHTS))]
    stretch = round(float(rng.uniform(*STRETCH_RANGE)), 3) if rng.random() < PROSODY_PROBABILITY else 1.0
    f0 = (round(speech.VOICE_F0[name] * float(rng.uniform(*F0_FACTOR_RANGE)), 1)
          if rng.random() < PROSODY_PROBABILITY else None)
    return Voice(name, stretch, f0)


def plan(seed: int, sizes: dict[str, Sizes]) -> dict[str, list[Clip]]:
    """Every clip of every split. Sentences are drawn once and cut into test, valid and train parts,
    so no sentence is in two splits; the test split alone uses the held-out voice."""
    needed = {s: sizes[s].speech + sizes[s].mix for s in SPLITS}
    pool = generate_sentences(seed, sum(needed.values()))
    parts, start = {}, 0
    for split in ("test", "valid", "train"):
        parts[split] = pool[start:start + needed[split]]
        start += needed[split]

    clips: dict[str, list[Clip]] = {}
    for split in SPLITS:
        rng = np.random.default_rng([seed, SPLIT_CODE[split], 0])
        sentences = iter(parts[split])
        split_clips = []
        for kind in KINDS:
            count = sizes[split].count(kind)
            labels = _balanced_labels(count, rng) if kind != "speech" else [None] * count
            for index in range(count):
                clip = Clip(split, kind, index, seed, event=labels[index])
                if kind != "event":
                    voice = Voice(speech.HELD_OUT_VOICE) if split == "test" else _train_voice(rng)
                    clip = replace(clip, sentence=next(sentences), voice=voice)
                if kind == "mix":
                    clip = replace(clip, snr_db=MIX_SNR_DB[int(rng.integers(len(MIX_SNR_DB)))])
                split_clips.append(clip)
        clips[split] = split_clips
    return clips


# --- annotations ---------------------------------------------------------------------------------

def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _speaker(clip: Clip) -> str:
    return "A woman" if speech.VOICE_SPEAKER[clip.voice.name] == "woman" else "A man"


def _entry(clip: Clip, task: str, text: str, question: str = "", metric: str = "none") -> dict:
    entry = {"path": clip.path, "text": text, "task": task, "Q": question, "kind": clip.kind}
    if clip.voice is not None:
        entry["voice"] = clip.voice.name
    if clip.event is not None:
        entry["event"] = clip.event
    if clip.snr_db is not None:
        entry["snr_db"] = clip.snr_db
    entry["metric"] = metric
    return entry


def _speech_question(clip: Clip, rng: np.random.Generator) -> dict:
    choice = int(rng.integers(4))
    if choice == 0:
        return _entry(clip, "QA", "Yes, someone is speaking.", _pick(SPEECH_PRESENT_QUESTIONS, rng))
    if choice == 1:
        return _entry(clip, "QA", f"{_speaker(clip)}.", _pick(GENDER_QUESTIONS, rng))
    if choice == 2:
        topic = clip.sentence.topic
        return _entry(clip, "QA", f"{topic[0].upper()}{topic[1:]}.", _pick(TOPIC_QUESTIONS, rng))
    return _entry(clip, "QA", "No, there is only speech.", _pick(ANY_BACKGROUND_QUESTIONS, rng))


def _yes_no_event(clip: Clip, rng: np.random.Generator) -> dict:
    asked = clip.event if rng.random() < 0.5 else _pick([n for n in EVENT_NAMES if n != clip.event], rng)
    question = _pick(YES_NO_QUESTIONS, rng).format(EVENTS_BY_NAME[asked].noun)
    return _entry(clip, "QA", "Yes." if asked == clip.event else "No.", question)


def _event_question(clip: Clip, rng: np.random.Generator) -> dict:
    cls = EVENTS_BY_NAME[clip.event]
    choice = int(rng.integers(4))
    if choice == 0:
        return _entry(clip, "QA", cls.source, _pick(SOURCE_QUESTIONS, rng), "event")
    if choice == 1:
        return _entry(clip, "QA", _pick(cls.captions, rng), _pick(EVENT_WHAT_QUESTIONS, rng), "event")
    if choice == 2:
        return _yes_no_event(clip, rng)
    return _entry(clip, "QA", "No, nobody is speaking.", _pick(SPEECH_PRESENT_QUESTIONS, rng))


def _mix_question(clip: Clip, rng: np.random.Generator) -> dict:
    cls = EVENTS_BY_NAME[clip.event]
    choice = int(rng.integers(6))
    if choice <= 1:
        return _entry(clip, "QA", _pick(cls.captions, rng), _pick(BACKGROUND_QUESTIONS, rng), "event")
    if choice == 2:
        caption = _pick(cls.captions, rng)
        return _entry(clip, "QA", f"Yes, {caption[0].lower()}{caption[1:]}", _pick(ANY_BACKGROUND_QUESTIONS, rng),
                      "event")
    if choice == 3:
        return _yes_no_event(clip, rng)
    if choice == 4:
        return _entry(clip, "QA", f"{_speaker(clip)}.", _pick(GENDER_QUESTIONS, rng))
    return _entry(clip, "QA", clip.sentence.text, _pick(WHAT_SAID_QUESTIONS, rng), "wer")


def annotate(clip: Clip) -> list[dict]:
    """The annotation entries of one clip: fixed tasks on the test split (transcripts, event names),
    a seeded mix of tasks elsewhere."""
    rng = clip.rng(ANNOTATE)
    if clip.kind == "speech":
        entries = [_entry(clip, "asr", clip.sentence.text, metric="wer")]
        if clip.split != "test":
            if rng.random() < 0.35:
                entries.append(_speech_question(clip, rng))
            if rng.random() < 0.1:
                entries.append(_entry(clip, "audiocaption", _pick(SPEAKER_CAPTIONS, rng).format(_speaker(clip))))
        return entries
    cls = EVENTS_BY_NAME[clip.event]
    if clip.kind == "event":
        entries = [_entry(clip, "audiocaption", _pick(cls.captions, rng), metric="event")]
        if clip.split == "test":
            entries.append(_entry(clip, "QA", cls.source, _pick(SOURCE_QUESTIONS, rng), "event"))
        elif rng.random() < 0.6:
            entries.append(_event_question(clip, rng))
        return entries
    if clip.split == "test":
        return [_entry(clip, "asr", clip.sentence.text, metric="wer"),
                _entry(clip, "QA", _pick(cls.captions, rng), _pick(BACKGROUND_QUESTIONS, rng), "event")]
    entries = []
    if rng.random() < 0.7:
        entries.append(_entry(clip, "asr", clip.sentence.text, metric="wer"))
    if rng.random() < 0.4:
        caption = f"{_speaker(clip)} is speaking while {cls.background}."
        entries.append(_entry(clip, "audiocaption", caption, metric="event"))
    if rng.random() < 0.6 or not entries:
        entries.append(_mix_question(clip, rng))
    return entries


# --- audio ---------------------------------------------------------------------------------------

def active_rms(x: np.ndarray) -> float:
    """RMS over the 20 ms frames within 30 dB of the loudest one (ignores silence and gaps)."""
    frame = SAMPLE_RATE // 50
    n = max(len(x) // frame, 1)
    energy = np.array([np.mean(x[i * frame:(i + 1) * frame] ** 2) for i in range(n)])
    if energy.max() <= 0:
        return 0.0
    return float(np.sqrt(energy[energy >= energy.max() * 1e-3].mean()))


def _set_rms(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = active_rms(x)
    return x * (10 ** (dbfs / 20) / rms) if rms > 0 else x


def _add_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = events.colored_noise(len(x), rng, float(rng.choice([0.0, 1.0, 2.0])))
    snr = rng.uniform(*NOISE_SNR_DB)
    return x + noise * (active_rms(x) / max(active_rms(noise), 1e-12)) * 10 ** (-snr / 20)


def _limit_peak(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max()
    return x * (MAX_PEAK / peak) if peak > MAX_PEAK else x


def _padded_speech(clip: Clip, rng: np.random.Generator) -> np.ndarray:
    wave = speech.synthesize(clip.sentence.text, clip.voice)
    room = max(MAX_CLIP_SECONDS - len(wave) / SAMPLE_RATE, 0.0)
    lead, tail = (min(rng.uniform(*SPEECH_PAD_SECONDS), room / 2) for _ in range(2))
    return np.concatenate([np.zeros(int(lead * SAMPLE_RATE)), wave, np.zeros(int(tail * SAMPLE_RATE))])


def render(clip: Clip) -> np.ndarray:
    """The clip's waveform (float64, 16 kHz), a function of the clip alone."""
    rng = clip.rng(RENDER)
    if clip.kind == "event":
        length = rng.uniform(*EVENT_SECONDS)
        sound = render_event(clip.event, length, rng)
        total = float(np.clip(length + rng.uniform(0.1, 1.2), MIN_CLIP_SECONDS, MAX_CLIP_SECONDS))
        offset = int(rng.uniform(0, max(total - length, 0.0)) * SAMPLE_RATE)
        wave = np.zeros(int(total * SAMPLE_RATE))
        wave[offset:offset + len(sound)] = sound[:len(wave) - offset]
        wave = _set_rms(wave, rng.uniform(*EVENT_RMS_DBFS))
    else:
        wave = _set_rms(_padded_speech(clip, rng), rng.uniform(*SPEECH_RMS_DBFS))
        if clip.kind == "mix":
            seconds = len(wave) / SAMPLE_RATE
            length = seconds * rng.uniform(0.6, 1.0)
            background = render_event(clip.event, length, rng)
            background *= active_rms(wave) / max(active_rms(background), 1e-12) * 10 ** (-clip.snr_db / 20)
            offset = int(rng.uniform(0, seconds - length) * SAMPLE_RATE)
            wave[offset:offset + len(background)] += background[:len(wave) - offset]
    if rng.random() < NOISE_PROBABILITY[clip.kind]:
        wave = _add_noise(wave, rng)
    return _limit_peak(wave)


def write_clip(clip: Clip, out_dir: Path) -> float:
    """Render and write one clip; returns its length in seconds."""
    wave = render(clip)
    soundfile.write(str(out_dir / clip.path), wave, SAMPLE_RATE, subtype="PCM_16")
    return len(wave) / SAMPLE_RATE


def _write_clip_task(args: tuple[Clip, str]) -> float:
    return write_clip(args[0], Path(args[1]))


# --- the whole set -------------------------------------------------------------------------------

def check_prerequisites() -> None:
    speech.check_flite(speech.TRAIN_VOICES + (speech.HELD_OUT_VOICE,))
    missing = events.missing_sound_files()
    if missing:
        raise NanoDataError(f"missing freedesktop sounds {', '.join(missing)} in {events.FREEDESKTOP_DIR} "
                            f"(apt-get install {events.FREEDESKTOP_PACKAGE})")


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def make_dataset(out_dir: str | Path, seed: int = 0, quick: bool = False, scale: float = 1.0,
                 jobs: int | None = None) -> dict:
    """Write `{train,valid,test}.json`, `prompts.json`, `dataset.json` (a summary, returned) and the
    WAV files under `audio/` into `out_dir`."""
    if scale <= 0:
        raise NanoDataError(f"--scale must be positive, got {scale}")
    check_prerequisites()
    out_dir = Path(out_dir)
    sizes = QUICK_SIZES if quick else {s: n.scaled(scale) for s, n in FULL_SIZES.items()}
    clips = plan(seed, sizes)
    for split in SPLITS:
        (out_dir / AUDIO_DIR / split).mkdir(parents=True, exist_ok=True)

    everything = [c for split in SPLITS for c in clips[split]]
    jobs = max(1, jobs or os.cpu_count() or 1)
    tasks = [(c, str(out_dir)) for c in everything]
    if jobs == 1:
        seconds = list(map(_write_clip_task, tasks))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            seconds = list(pool.map(_write_clip_task, tasks, chunksize=8))
    length = dict(zip((c.path for c in everything), seconds))

    summary = {"seed": seed, "quick": quick, "scale": scale, "sample_rate": SAMPLE_RATE,
               "held_out_voice": speech.HELD_OUT_VOICE, "train_voices": list(speech.TRAIN_VOICES),
               "event_classes": list(EVENT_NAMES), "splits": {}}
    for split in SPLITS:
        entries = [e for clip in clips[split] for e in annotate(clip)]
        _dump_json(out_dir / f"{split}.json", {"annotation": entries})
        tasks_count: dict[str, int] = {}
        for e in entries:
            tasks_count[e["task"]] = tasks_count.get(e["task"], 0) + 1
        summary["splits"][split] = {
            "clips": {k: sizes[split].count(k) for k in KINDS},
            "entries": len(entries), "tasks": tasks_count,
            "hours": round(sum(length[c.path] for c in clips[split]) / 3600, 3),
            "max_clip_seconds": round(max(length[c.path] for c in clips[split]), 3),
        }
    _dump_json(out_dir / PROMPTS_FILE, PROMPTS)
    _dump_json(out_dir / SUMMARY_FILE, summary)
    return summary
