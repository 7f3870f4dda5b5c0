"""Time to first token of the first and the second question about one clip (issue 18: encode once, ask many).

    python benchmarks/ask_many.py --model DIR [--model DIR ...] [--clip WAV] [--threads N] [--repeats N] [--out FILE]

Each model answers two questions about the same clip the way `salmonn ask CLIP -p Q1 -p Q2` does
(`ask.answer_prompts`), one token each, timed from the file's path to each question's first token: the
first question's time holds reading the clip, the features, the audio encoder and the prefill of BOS,
the text before the audio, the audio and the question; the second continues from the KV cache's audio
and prefills only its own text. Beside them, a separate ask of the second question (`embed_file` and
`Pipeline.answer` on a fresh cache: what a second `salmonn ask` run costs once the model is loaded), and
`salmonn chat`'s second turn after a 32-token first answer (`chat.Conversation`: it decodes the first
answer's last token, EOS, BOS and the follow-up). Greedy and 4 beams; runs alternate, medians of
--repeats, after one warm-up. Default clip: 30 s of real audio (benchmarks/artefacts.py `make_clip`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import artefacts  # noqa: E402
from pipeline import machine, table, write_atomically  # noqa: E402  (the machine description, Markdown helpers)
from salmonn_cli.ask import answer_prompts, embed_file  # noqa: E402
from salmonn_cli.audio_input import open_audio  # noqa: E402
from salmonn_cli.chat import Conversation  # noqa: E402
from salmonn_cli.decoding import DecodingOptions  # noqa: E402
from salmonn_cli.pipeline import Pipeline, RuntimeOptions  # noqa: E402

FIRST = "Describe the audio."
SECOND = "What does the speaker say?"
CHAT_FIRST_ANSWER = 32
BEAMS = (1, 4)


def ask_two(pipeline: Pipeline, clip: Path, beams: int) -> tuple[float, float]:
    """(first question's time to first token, second's), as `salmonn ask CLIP -p Q1 -p Q2` runs them."""
    marks = []
    pipeline.llm.reset()        # as in a new process: the last run's cache holds this very audio
    t0 = time.perf_counter()
    answer_prompts(pipeline, open_audio(str(clip)), [FIRST, SECOND], decoding=DecodingOptions(max_tokens=1, beams=beams),
                   on_prompt=lambda prompt: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return marks[1] - t0, end - marks[1]


def ask_alone(pipeline: Pipeline, clip: Path, beams: int) -> float:
    """The second question asked on its own: the audio encoded and prefilled again."""
    t0 = time.perf_counter()
    embeds = embed_file(pipeline, open_audio(str(clip))).embeds
    pipeline.answer(embeds, SECOND, DecodingOptions(max_tokens=1, beams=beams))
    return time.perf_counter() - t0


def chat_second_turn(pipeline: Pipeline, clip: Path) -> tuple[float, int]:
    """(time to first token of chat's second turn, tokens of the first answer)."""
    talk = Conversation(pipeline, embed_file(pipeline, open_audio(str(clip))).embeds)
    first = talk.ask(FIRST, decoding=DecodingOptions(max_tokens=CHAT_FIRST_ANSWER, beams=1))
    t0 = time.perf_counter()
    talk.ask(SECOND, decoding=DecodingOptions(max_tokens=1, beams=1))
    return time.perf_counter() - t0, len(first.tokens)


def measure(model: Path, clip: Path, threads: int, repeats: int, log) -> dict:
    decoding = DecodingOptions(max_tokens=CHAT_FIRST_ANSWER, beams=max(BEAMS))
    with Pipeline(str(model), RuntimeOptions(n_threads=threads, device="cpu"), decoding) as pipeline:
        for beams in BEAMS:                     # warm-up
            ask_two(pipeline, clip, beams)
        runs = {beams: {"first": [], "second": [], "alone": []} for beams in BEAMS}
        chat, answered = [], 0
        for r in range(repeats):
            for beams in BEAMS:
                first, second = ask_two(pipeline, clip, beams)
                runs[beams]["first"].append(first)
                runs[beams]["second"].append(second)
                runs[beams]["alone"].append(ask_alone(pipeline, clip, beams))
            seconds, answered = chat_second_turn(pipeline, clip)
            chat.append(seconds)
            log(f"{model.name}: repeat {r + 1}/{repeats} done")
        audio_tokens = len(embed_file(pipeline, open_audio(str(clip))).embeds)
        return {"model": model.name, "quant": pipeline.manifest.quant, "audio_tokens": audio_tokens,
                "runs": runs, "chat": chat, "chat_first_answer_tokens": answered}


def report(results: list[dict], m: dict, clip: Path, threads: int, repeats: int, command: str) -> str:
    rows = []
    for res in results:
        for beams, runs in res["runs"].items():
            first, second, alone = (statistics.median(runs[k]) for k in ("first", "second", "alone"))
            rows.append([res["model"], res["quant"], "greedy" if beams == 1 else f"{beams} beams",
                         f"{first:.4f}", f"{second:.4f}", f"{second / first:.3f}x", f"{alone:.4f}"])
        chat = statistics.median(res["chat"])
        first = statistics.median(res["runs"][1]["first"])
        rows.append([res["model"], res["quant"], f"chat turn 2 (after {res['chat_first_answer_tokens']} tokens)",
                     f"{first:.4f}", f"{chat:.4f}", f"{chat / first:.3f}x", ""])
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    lines = [
        "# Encode once, ask many: time to first token of a second question",
        "",
        f"`{command}` on {m['date']}.",
        "",
        f"- CPU: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores; RAM {m['ram_gib']:.1f} GiB; GPU: {m['gpu']} "
        f"(not used: `--device cpu`)",
        f"- {m['os']}, Python {m['python']}; load average at start {load}"
        + (" (the machine is shared: other work was running)" if m["load_average"][0] > 0.5 else ""),
        f"- {versions}",
        "",
        f"Clip: {clip.name} (audio tokens: "
        + ", ".join(f"{r['model']} {r['audio_tokens']}" for r in results) + f"). Threads: {threads}. "
        f"Medians of {repeats} alternating runs after a warm-up. First question: \"{FIRST}\" from the file's path "
        "(read, features, encoder, prefill of BOS + text + audio + question) to its first token. Second question: "
        f"\"{SECOND}\", continuing from the kept audio cache, to its first token. Separate ask: the second "
        "question on its own (the audio encoded and prefilled again). Chat turn 2: `salmonn chat`'s follow-up "
        "after a first answer of that many tokens (its last token, EOS, BOS and the question decoded). Target: "
        "second / first <= 0.1.",
        "",
        table(["model", "quant", "decoding", "first question s", "second question s", "second / first",
               "separate ask of the second s"], rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model directory (repeat for several)")
    ap.add_argument("--clip", help="audio file [default: 30 s of real audio made in --work]")
    ap.add_argument("--work", default=str(artefacts.DEFAULT_WORK), help="where the default clip is made")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the markdown report here as well as to stdout")
    args = ap.parse_args(argv)

    def log(message: str) -> None:
        print(f"[ask_many] {message}", file=sys.stderr, flush=True)

    m = machine()
    clip = Path(args.clip) if args.clip else artefacts.make_clip(Path(args.work), 30.0)
    results = [measure(Path(model), clip, args.threads, args.repeats, log) for model in args.model]
    command = "python benchmarks/ask_many.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, m, clip, args.threads, args.repeats, command)
    print(text)
    if args.out:
        write_atomically(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
