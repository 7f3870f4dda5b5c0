"""Transcription and translation of audio of any length: the file is cut into chunks of at most
30 s at quiet seams (`salmonn_cli.chunks`), each chunk is answered with the official SALMONN task
prompt, and each answer becomes a segment with its chunk's start and end time.

Times are chunk-level (where the chunk was cut), not word-level.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import numpy as np

from salmonn_cli.audio_input import AudioInput, open_audio
from salmonn_cli.chunks import CHUNK_SECONDS, SEAM_SEARCH_SECONDS, AudioChunk, iter_chunks
from salmonn_cli.decoding import DecodingOptions, RepetitionGuard
from salmonn_cli.errors import SalmonnError
from salmonn_cli.prompt import TRANSCRIBE_PROMPT, TRANSLATE_PROMPT

# The official SALMONN task prompts (train/test_prompt.json: asr, translation_en2de/en2ja).
TASK_TRANSCRIBE = "transcribe"
TASK_TRANSLATE = "translate"
# ... and the training task (official annotation name, `Manifest.tasks`) each one needs the model to know
TRAINING_TASK = {TASK_TRANSCRIBE: "asr", TASK_TRANSLATE: "translation"}

# A chunk whose loudest sample is below this is silence: it is not sent to the model, which
# would otherwise invent text for it.
SILENCE_PEAK_DBFS = -60.0

# ISO 639-1 code -> English name (the name goes into the translation prompt).
LANGUAGES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fil": "Filipino", "fr": "French", "ga": "Irish", "gl": "Galician",
    "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer",
    "kn": "Kannada", "ko": "Korean", "la": "Latin", "lo": "Lao", "lt": "Lithuanian",
    "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi",
    "ms": "Malay", "mt": "Maltese", "my": "Burmese", "ne": "Nepali", "nl": "Dutch",
    "no": "Norwegian", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian",
    "so": "Somali", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish",
    "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "yi": "Yiddish",
    "yo": "Yoruba", "zh": "Chinese", "zu": "Zulu",
}
# Other names people type for a language in the table.
LANGUAGE_ALIASES = {
    "mandarin": "Chinese", "cantonese": "Cantonese", "farsi": "Persian", "castilian": "Spanish",
    "flemish": "Dutch", "moldavian": "Romanian", "panjabi": "Punjabi", "bokmal": "Norwegian",
    "bokmål": "Norwegian",
}


def language_name(value: str) -> str:
    """The English name of a language given as an ISO 639-1 code (any case, region suffix allowed:
    "pt-BR") or as a name (any case)."""
    key = value.strip().lower()
    code = key.replace("_", "-").split("-")[0]
    if code in LANGUAGES:
        return LANGUAGES[code]
    by_name = {name.lower(): name for name in LANGUAGES.values()}
    if key in by_name:
        return by_name[key]
    if key in LANGUAGE_ALIASES:
        return LANGUAGE_ALIASES[key]
    raise SalmonnError(f"unknown language {value.strip()!r}: give an ISO 639-1 code (de, ja, zh, fr, ...) "
                       "or an English language name (German, Japanese, ...)")


def task_prompt(translate: str | None = None) -> str:
    """The official instruction: transcription, or translation into `translate` (code or name)."""
    if translate is None:
        return TRANSCRIBE_PROMPT
    return TRANSLATE_PROMPT.format(language=language_name(translate))


# --- results -------------------------------------------------------------------------------------

@dataclass
class Segment:
    start: float                 # seconds from the file's start (chunk-level)
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""        # as `Answer.stop_reason`; "repetition" when the guard cut a loop
    chunk: int = 0               # index of the chunk it came from

    def to_dict(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


@dataclass
class Transcript:
    audio: str
    task: str                    # "transcribe" or "translate"
    language: str | None         # target language name when translating
    prompt: str
    seconds: float               # audio length
    segments: list[Segment]
    n_chunks: int
    skipped_silent: int          # chunks not decoded because they were silent
    elapsed_s: float

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)

    def metadata(self) -> dict:
        return {"audio": self.audio, "task": self.task, "language": self.language,
                "prompt": self.prompt, "audio_seconds": round(self.seconds, 3),
                "chunks": self.n_chunks, "skipped_silent_chunks": self.skipped_silent,
                "elapsed_s": round(self.elapsed_s, 3)}

    def to_dict(self) -> dict:
        return {**self.metadata(), "text": self.text, "segments": [s.to_dict() for s in self.segments]}


@dataclass
class TranscribeOptions:
    translate: str | None = None            # target language (code or name); None transcribes
    decoding: DecodingOptions | None = None  # None: the pipeline's own
    chunk_seconds: float = CHUNK_SECONDS
    seam_search_seconds: float = SEAM_SEARCH_SECONDS
    repetition_guard: RepetitionGuard | None = field(default_factory=RepetitionGuard)
    skip_silence: bool = True


# --- progress ------------------------------------------------------------------------------------

def progress_wanted(total_seconds: float | None, chunk_seconds: float, force: bool | None) -> bool:
    """A bar only for files of more than one chunk, on a terminal stderr unless forced."""
    if force is False or total_seconds is None or total_seconds <= chunk_seconds:
        return False
    return bool(force) or _isatty(sys.stderr)


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


class ChunkProgress:
    """A rich progress bar on stderr over the seconds of audio done, counting chunks.

    Text printed to a terminal stdout meanwhile is shown above the bar; stdout that goes to a
    file or pipe is left alone (rich would otherwise send it to stderr).
    """

    def __init__(self, label: str, total_seconds: float, forced: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                                  TextColumn("chunk {task.fields[chunk]}"), TimeRemainingColumn(),
                                  console=Console(stderr=True, force_terminal=forced or None),
                                  transient=True, redirect_stdout=_isatty(sys.stdout))
        self._task = self._progress.add_task(label, total=total_seconds, chunk=0)

    def __enter__(self) -> "ChunkProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def chunk_done(self, chunk: AudioChunk) -> None:
        self._progress.update(self._task, completed=chunk.end_s, chunk=chunk.index + 1)


# --- the flow ------------------------------------------------------------------------------------

def is_silent(wave: np.ndarray) -> bool:
    return wave.size == 0 or float(np.max(np.abs(wave))) < 10 ** (SILENCE_PEAK_DBFS / 20)


def check_trained_for(manifest, translate: str | None) -> None:
    """Refuse a task the model never learned: asked anyway, it answers with made-up text."""
    task = TASK_TRANSLATE if translate else TASK_TRANSCRIBE
    if not manifest.trained_for(TRAINING_TASK[task]):
        raise SalmonnError(f"the model in {manifest.model_dir} was not trained to {task} (it learned: "
                           f"{', '.join(manifest.tasks) or 'nothing'}); to {task}, export the official SALMONN "
                           "weights with `salmonn export --official-ckpt ...` and pass its folder with --model")


def transcribe_chunk(pipeline, chunk: AudioChunk, prompt: str, options: TranscribeOptions) -> Segment | None:
    """The chunk's segment (None: no text); a loop the repetition guard stopped is cut to its first copy."""
    embeds, _ = pipeline.embed_wave(chunk.wave)
    answer = pipeline.answer(embeds, prompt, options.decoding, stop=options.repetition_guard)
    if not answer.text:
        return None
    return Segment(chunk.start_s, chunk.end_s, answer.text, answer.tokens, answer.stop_reason, chunk.index)


def transcribe_file(pipeline, source: str | os.PathLike | BinaryIO | AudioInput,
                    options: TranscribeOptions | None = None,
                    on_segment: Callable[[Segment], None] | None = None,
                    progress: bool | None = None) -> Transcript:
    """Transcribe (or translate) a file of any length with a loaded `Pipeline`.

    The file is read in blocks; chunks are at most `options.chunk_seconds` (<= the model's
    `max_seconds`). `on_segment` gets each segment as soon as its chunk is decoded. `progress`:
    None shows a bar on a terminal for files longer than one chunk, True forces it, False never.
    """
    options = options or TranscribeOptions()
    max_seconds = pipeline.config.max_seconds
    if not 0 < options.chunk_seconds <= max_seconds:
        raise SalmonnError(f"the chunk length must be in (0, {max_seconds:g}] seconds")
    prompt = task_prompt(options.translate)      # fails early on an unknown language
    check_trained_for(pipeline.manifest, options.translate)
    t0 = time.perf_counter()
    audio_in = open_audio(source)
    name, total = audio_in.name, audio_in.seconds
    chunks = iter_chunks(audio_in, pipeline.config.sample_rate, options.chunk_seconds,
                         min(options.seam_search_seconds, options.chunk_seconds / 2))
    bar = (ChunkProgress(os.path.basename(name), total, forced=bool(progress))
           if progress_wanted(total, options.chunk_seconds, progress) else None)
    segments: list[Segment] = []
    seconds, n_chunks, skipped = 0.0, 0, 0
    with bar or contextlib.nullcontext():
        for chunk in chunks:
            n_chunks += 1
            seconds = chunk.end_s
            silent = options.skip_silence and is_silent(chunk.wave)
            skipped += silent
            segment = None if silent else transcribe_chunk(pipeline, chunk, prompt, options)
            if bar is not None:
                bar.chunk_done(chunk)
            if segment is not None:
                segments.append(segment)
                if on_segment is not None:
                    on_segment(segment)
    language = language_name(options.translate) if options.translate else None
    return Transcript(name, TASK_TRANSLATE if language else TASK_TRANSCRIBE, language, prompt,
                      seconds, segments, n_chunks, skipped, time.perf_counter() - t0)
