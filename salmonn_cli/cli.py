"""The `salmonn` command line. Heavy modules are imported inside the commands that need them; none
imports torch: `export` runs the PyTorch side as a program of its own (training_side.py)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from salmonn_cli import stdout_guard
from salmonn_cli.beams import MAX_BEAMS
from salmonn_cli.errors import DEBUG_ENV, INTERRUPTED, OutputError, ReportedError, SalmonnError, quoted

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Ask questions about audio on your own machine (SALMONN: Whisper + BEATs + a LLaMA LLM).",
)

BROKEN_PIPE = 128 + signal.SIGPIPE   # stdout's reader went away: what a shell reports for SIGPIPE


def one_line(text: str) -> str:
    """Whatever a message holds, it stays one line on stderr."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def say(kind: str, message: str) -> None:
    print(f"salmonn: {kind}{one_line(message)}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say("warning: ", message)


def notice(message: str) -> None:
    say("notice: ", message)


def warn_if_cut_short(audio_in) -> None:
    shortfall = audio_in.shortfall()
    if shortfall is not None:
        promised, there = shortfall
        warn(f"{quoted(audio_in.name)} is cut short: its header promises {promised:.1f} s of audio, "
             f"only {there:.1f} s are there (all of it was used)")


# --- options shared by the commands that run a model ---------------------------------------------

def model_option():
    return typer.Option(None, "--model", "-m", help="Model directory from `salmonn export` [default: $SALMONN_MODEL, else the built-in salmonn-nano].")


def threads_option():
    return typer.Option(None, "--threads", min=1, help="CPU threads [default: half the cores].")


def device_option():
    return typer.Option("auto", "--device", help="auto: CUDA for the audio encoder and the LLM where each really works, else "
                        "the CPU; cpu; cuda: fail with one line naming what is missing instead of running on the CPU.")


def gpu_layers_option():
    return typer.Option(None, "--n-gpu-layers", min=-1, help="LLM layers offloaded when the LLM runs on CUDA "
                        "[default: all]; fewer for a GPU too small for the model, 0 keeps the LLM on the CPU.")


def verbose_option():
    return typer.Option(False, "--verbose", "-v", help="Say on stderr where each part runs (the encoder's ONNX Runtime "
                        "provider, the LLM layers on the GPU).")


def lora_scale_option():
    return typer.Option(None, "--lora-scale", help="LoRA strength of the LLM [default: the trained alpha/r, 4.0 for SALMONN]. "
                        "Lower values bring back more of the base LLM's free-form behaviour (0 = the base LLM).")


def context_option():
    return typer.Option(None, "--context", min=64, help="LLM context in tokens [default: 2048, at most what the LLM was trained on]; "
                        "audio past 30 s fills what the prompt and answer leave free.")


def top_p_option():
    return typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0).")


def seed_option():
    return typer.Option(None, "--seed", help="Random seed for sampling.")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


def check_model_option(model: Optional[str]) -> None:
    if model is not None and not model.strip():
        raise SalmonnError("--model is empty: give a model directory, or leave the option out for the default model")


def runtime_options(threads, device, n_gpu_layers, lora_scale, context):
    from salmonn_cli.device import check_device
    from salmonn_cli.pipeline import RuntimeOptions

    options = RuntimeOptions(device=check_device(device), n_gpu_layers=n_gpu_layers, lora_scale=lora_scale,
                             context=context)
    if threads:
        # more threads than cores only makes llama.cpp's threads wait for each other, and a run
        # slows down the more of them there are
        cores = available_cores()
        if threads > cores:
            notice(f"--threads {threads} is more than the {cores} cores available; using {cores}")
            threads = cores
        options.n_threads = threads
    return options


def report_placement(pipeline, verbose: bool) -> None:
    if verbose:
        say("", pipeline.placement.describe())


def split_prompt(inputs: list[str], prompts: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """`ask AUDIO... PROMPT` or `ask AUDIO... -p PROMPT [-p PROMPT...]`."""
    if prompts:
        return inputs, list(prompts)
    if len(inputs) < 2:
        raise SalmonnError('give the audio and the prompt: salmonn ask AUDIO "PROMPT" (or -p PROMPT)')
    *files, prompt = inputs
    if len(files) > 1 and Path(prompt).is_file():
        raise SalmonnError(f"the last argument {prompt!r} is a file, not a prompt; give the prompt with -p")
    return files, [prompt]


def each_input(names: list[str], work, jsonl: bool) -> tuple[list[dict | None], int]:
    """`work(name, shown name)` for each input: its result (a dict, or None when written elsewhere);
    with several inputs a failing one is reported on stderr and skipped. `jsonl`: each result printed
    as it comes. Returns the results and how many inputs failed (the exit code says whether any did)."""
    from salmonn_cli.ask import display_name

    results, failed = [], 0
    for name in names:
        shown = display_name(name)
        try:
            result = work(name, shown)
        except OutputError:
            raise
        except SalmonnError as e:
            if len(names) == 1:
                raise
            failed += 1
            say("error: ", f"{quoted(shown)}: {e}")
            result = {"audio": shown, "error": str(e)}
        if jsonl and result is not None:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        results.append(result)
    return results, failed


def print_header(shown: str) -> None:
    """Which of several inputs the text that follows is about."""
    print(f"==> {shown if shown.isprintable() else quoted(shown)} <==", flush=True)


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- ask -----------------------------------------------------------------------------------------

@app.command()
def ask(
    inputs: list[str] = typer.Argument(..., metavar="AUDIO... [PROMPT]", help="Audio files (wav, flac, ogg, mp3, ...; "
                                       "any rate, any channels; - reads standard input), then the prompt unless -p is given."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help='What to ask, e.g. "Describe the audio."; '
                                               "repeat it to ask several questions about the same audio "
                                               "(encoded once, its LLM cache reused for each)."),
    model: Optional[str] = model_option(),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = no sampling (greedy, or --beams); > 0 samples with one beam."),
    top_p: float = top_p_option(),
    seed: Optional[int] = seed_option(),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, max=MAX_BEAMS, help="Beam search with N beams (the official "
                                        "SALMONN decoding uses 4); 1 = greedy; the answer is printed when the search ends "
                                        "[default: the model's own, from its manifest; 1 with --temperature > 0]."),
    truncate: bool = typer.Option(False, "--truncate", help="Use only the first 30 s of each file, as the official SALMONN does."),
    per_chunk: bool = typer.Option(False, "--per-chunk", help="Answer for each ≤30 s chunk of the file separately."),
    repetition_guard: Optional[bool] = typer.Option(None, "--repetition-guard/--no-repetition-guard",
                                                    help="Stop an answer that starts repeating itself and keep its "
                                                    "first copy (streamed text shows the repeats made before it "
                                                    "stopped) [default: the model's own, from its manifest: on for "
                                                    "salmonn-nano, off for exports, decoding as the official SALMONN does]."),
    per_window: bool = typer.Option(False, "--per-window", hidden=True),     # the old name of --per-chunk
    threads: Optional[int] = threads_option(),
    device: str = device_option(),
    n_gpu_layers: Optional[int] = gpu_layers_option(),
    verbose: bool = verbose_option(),
    lora_scale: Optional[float] = lora_scale_option(),
    context: Optional[int] = context_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of streaming text: one object (a list for several files)."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print one JSON object per file, as each finishes."),
) -> None:
    """Answer a question about audio clips (the model is loaded once for all of them)."""
    from salmonn_cli.decoding import DecodingOptions
    from salmonn_cli.default_model import resolve_model_dir
    from salmonn_cli.pipeline import Pipeline
    from salmonn_cli.prompt import check_instruction

    files, prompts = split_prompt(inputs, prompt)
    per_chunk = per_chunk or per_window
    for prompt in prompts:
        check_instruction(prompt)
    check_model_option(model)
    if files.count("-") > 1:
        raise SalmonnError("standard input (-) can be read only once")
    if truncate and per_chunk:
        raise SalmonnError("--truncate and --per-chunk do not go together")
    if per_chunk and len(prompts) > 1:
        raise SalmonnError("--per-chunk answers one prompt; give -p once")
    if as_json and jsonl:
        raise SalmonnError("give either --json or --jsonl, not both")
    decoding = DecodingOptions(max_tokens=max_tokens, beams=beams, temperature=temperature, top_p=top_p, seed=seed)
    runtime = runtime_options(threads, device, n_gpu_layers, lora_scale, context)
    streaming = not (as_json or jsonl)

    def work(name: str, shown: str) -> dict:
        if streaming and len(files) > 1:
            print_header(shown)
        if per_chunk:
            return ask_each_chunk(pipeline, name, prompts[0], streaming, guard=guard)
        return ask_file(pipeline, name, shown, prompts, truncate=truncate, streaming=streaming, guard=guard)

    with Pipeline(resolve_model_dir(model), runtime, decoding) as pipeline:
        report_placement(pipeline, verbose)
        guard = pipeline.repetition_guard(repetition_guard)
        results, failed = each_input(files, work, jsonl)
    if as_json:
        print(json.dumps(results[0] if len(files) == 1 else results, ensure_ascii=False))
    if failed:
        raise typer.Exit(SalmonnError.exit_code)


def report_audio(pipeline, audio_in, audio, shown: str, truncate: bool) -> None:
    """Warn when not all of a file reaches the model, or when it goes past what the model was trained on."""
    warn_if_cut_short(audio_in)
    if audio.truncated:
        hint = "" if truncate else "; raise --context for more"
        warn(f"{quoted(shown)} is {audio.seconds:.1f} s long; only the first {audio.used_seconds:.1f} s "
             f"are used{hint}")
    if len(audio.chunks) > 1:
        notice(f"{quoted(shown)}: {len(audio.chunks)} chunks of audio go to the model back to back, "
               f"past the {pipeline.config.max_seconds:g} s the official model was trained on")


def ask_file(pipeline, name: str, shown: str, prompts: list[str], *, truncate: bool, streaming: bool,
             guard=None) -> dict:
    """An answer to each prompt about the whole file (as much as fits in the context), streamed as it
    comes; with several prompts each answer follows its prompt (`Q: ...`, `A: ...`)."""
    from salmonn_cli.ask import FileAnswer, answer_prompts
    from salmonn_cli.audio_input import open_audio

    audio_in = open_audio(name)

    def on_audio(audio) -> None:
        report_audio(pipeline, audio_in, audio, shown, truncate)

    labels = iter(range(len(prompts)) if streaming and len(prompts) > 1 else ())

    def on_prompt(prompt: str) -> None:
        n = next(labels, None)
        if n is not None:
            write_out(("\n" if n else "") + f"Q: {one_line(prompt)}\nA: ")

    result = answer_prompts(pipeline, audio_in, prompts, truncate=truncate, on_audio=on_audio, on_prompt=on_prompt,
                            on_text=write_out if streaming else None, stop=guard)
    if streaming:
        write_out("\n")
    if len(prompts) == 1:
        return FileAnswer(result.audio, result.answers[0], result.model).to_dict()
    return result.to_dict()


def ask_each_chunk(pipeline, name: str, prompt: str, streaming: bool, *, guard=None) -> dict:
    """One answer per chunk, each streamed after its times."""
    from salmonn_cli.ask import answer_each_chunk, chunk_label
    from salmonn_cli.audio_input import open_audio

    audio_in = open_audio(name)

    def on_chunk(chunk) -> None:
        if streaming:
            write_out(("\n" if chunk.index else "") + chunk_label(chunk))

    result = answer_each_chunk(pipeline, audio_in, prompt, on_chunk=on_chunk,
                               on_text=write_out if streaming else None, stop=guard)
    if streaming and result.chunks:
        write_out("\n")
    warn_if_cut_short(audio_in)
    return result.to_dict()


# --- chat --------------------------------------------------------------------------------------

@app.command()
def chat(
    audio: str = typer.Argument(..., metavar="AUDIO", help="The recording to talk about (a file: the questions "
                                "come from standard input)."),
    model: Optional[str] = model_option(),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = no sampling (greedy, or --beams); > 0 samples with one beam."),
    top_p: float = top_p_option(),
    seed: Optional[int] = seed_option(),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, max=MAX_BEAMS, help="Beam search with N beams; each answer "
                                        "is printed when its search ends [default: the model's own]."),
    truncate: bool = typer.Option(False, "--truncate", help="Use only the first 30 s, as the official SALMONN does."),
    repetition_guard: Optional[bool] = typer.Option(None, "--repetition-guard/--no-repetition-guard",
                                                    help="Stop an answer that starts repeating itself and keep its "
                                                    "first copy [default: the model's own, as salmonn ask]."),
    threads: Optional[int] = threads_option(),
    device: str = device_option(),
    n_gpu_layers: Optional[int] = gpu_layers_option(),
    verbose: bool = verbose_option(),
    lora_scale: Optional[float] = lora_scale_option(),
    context: Optional[int] = context_option(),
) -> None:
    """Ask follow-up questions about one recording: a question per line on standard input, each answer
    streamed; earlier questions and answers stay in the conversation. Ctrl-D ends."""
    from salmonn_cli.ask import embed_file
    from salmonn_cli.audio_input import open_audio
    from salmonn_cli.chat import Conversation
    from salmonn_cli.decoding import DecodingOptions
    from salmonn_cli.default_model import resolve_model_dir
    from salmonn_cli.pipeline import Pipeline

    if audio == "-":
        raise SalmonnError("chat reads its questions from standard input: give the audio as a file")
    check_model_option(model)
    decoding = DecodingOptions(max_tokens=max_tokens, beams=beams, temperature=temperature, top_p=top_p, seed=seed)
    runtime = runtime_options(threads, device, n_gpu_layers, lora_scale, context)
    audio_in = open_audio(audio)        # a missing file fails before the model loads
    interactive = sys.stdin.isatty()
    failed = 0

    def forget(n_ctx: int) -> None:
        notice(f"the conversation no longer fits in the {n_ctx}-token context: earlier questions and answers "
               "are dropped, the audio stays (--context raises the limit)")

    with Pipeline(resolve_model_dir(model), runtime, decoding) as pipeline:
        report_placement(pipeline, verbose)
        embedded = embed_file(pipeline, audio_in, truncate=truncate)
        report_audio(pipeline, audio_in, embedded, audio_in.name, truncate)
        conversation = Conversation(pipeline, embedded.embeds)
        guard = pipeline.repetition_guard(repetition_guard)
        while True:
            question = read_question(interactive)
            if question is None:
                break
            if not question.strip():
                continue
            try:
                conversation.ask(question, on_text=write_out, on_forget=forget, stop=guard)
            except OutputError:
                raise
            except SalmonnError as e:
                failed += 1
                say("error: ", str(e))
                continue
            write_out("\n")
    if failed:
        raise typer.Exit(SalmonnError.exit_code)


def read_question(interactive: bool) -> str | None:
    """The next line of standard input (a "> " prompt on a terminal), or None at its end (Ctrl-D)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            write_out("\n")
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


# --- transcribe ----------------------------------------------------------------------------------

@app.command()
def transcribe(
    inputs: list[str] = typer.Argument(..., metavar="AUDIO...", help="Audio files of any length (- reads standard input)."),
    translate: Optional[str] = typer.Option(None, "--translate", help="Translate into LANG (ISO 639-1 code such as de, ja, zh, "
                                            "or an English name) instead of transcribing."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="txt, srt, vtt or json [default: from the -o extension "
                                      "(.txt, .srt, .vtt, .json; none: txt)]."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write here (atomically) instead of stdout: a file, "
                                         "or a directory (existing, or ending in /) that gets NAME.FORMAT per input. "
                                         "Never an input or a non-regular file; an existing .txt/.srt/.vtt/.json is replaced."),
    model: Optional[str] = model_option(),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens per chunk."),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, max=MAX_BEAMS, help="Beam search with N beams (the official "
                                        "decoding uses 4; 1 = greedy) "
                                        "[default: the model's own, from its manifest]."),
    repetition_guard: bool = typer.Option(True, "--repetition-guard/--no-repetition-guard",
                                          help="Stop a chunk whose output starts repeating itself."),
    keep_silence: bool = typer.Option(False, "--keep-silence", help="Also decode chunks that are silent."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar on stderr "
                                            "[default: on a terminal, for audio over 30 s]."),
    threads: Optional[int] = threads_option(),
    device: str = device_option(),
    n_gpu_layers: Optional[int] = gpu_layers_option(),
    verbose: bool = verbose_option(),
    lora_scale: Optional[float] = lora_scale_option(),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print one JSON object per file (text, segments), as each finishes."),
) -> None:
    """Transcribe or translate speech of any length, chunk by chunk (times are chunk-level)."""
    from salmonn_cli.audio_input import open_audio
    from salmonn_cli.decoding import DecodingOptions, RepetitionGuard
    from salmonn_cli.default_model import resolve_model_dir
    from salmonn_cli.output_paths import plan_outputs
    from salmonn_cli.pipeline import Pipeline
    from salmonn_cli.subtitles import write_subtitles
    from salmonn_cli.transcribe import TranscribeOptions, check_trained_for, task_prompt, transcribe_file

    task_prompt(translate)   # an unknown language fails before the model loads
    check_model_option(model)
    if inputs.count("-") > 1:
        raise SalmonnError("standard input (-) can be read only once")
    if output is not None and jsonl:
        raise SalmonnError("--jsonl prints to standard output; it does not go with -o")
    plan = plan_outputs(inputs, output, fmt)     # before any audio is read: nothing is decoded in vain
    fmt = plan.format
    targets = iter(plan.targets)            # one per input, in the order `each_input` goes
    runtime = runtime_options(threads, device, n_gpu_layers, lora_scale, None)
    options = TranscribeOptions(translate=translate, repetition_guard=RepetitionGuard() if repetition_guard else None,
                                skip_silence=not keep_silence)

    def work(name: str, shown: str) -> dict | None:
        target = next(targets)
        stream_txt = fmt == "txt" and target is None and not jsonl
        if len(inputs) > 1 and target is None and not jsonl:
            print_header(shown)
        audio_in = open_audio(name)
        result = transcribe_file(pipeline, audio_in, options, progress=progress,
                                 on_segment=(lambda seg: print(seg.text, flush=True)) if stream_txt else None)
        warn_if_cut_short(audio_in)
        if not (stream_txt or jsonl):
            write_subtitles(result.segments, fmt, target, result.metadata())
        return result.to_dict() if jsonl else None

    with Pipeline(resolve_model_dir(model), runtime, DecodingOptions(max_tokens=max_tokens, beams=beams)) as pipeline:
        report_placement(pipeline, verbose)
        check_trained_for(pipeline.manifest, translate)     # once, not once per file
        failed = each_input(inputs, work, jsonl)[1]
    if failed:
        raise typer.Exit(SalmonnError.exit_code)


# --- listen --------------------------------------------------------------------------------------

@app.command()
def listen(
    mic: bool = typer.Option(False, "--mic", help="Listen to the default or chosen microphone (the default when --input is not given)."),
    input_path: Optional[str] = typer.Option(None, "--input", "-i", help="Replay an audio file in real time instead of "
                                             "capturing (the same code path as the microphone)."),
    speed: float = typer.Option(1.0, "--speed", min=0.0, help="Replay pace for --input (2 = twice real time, 0 = as fast as possible)."),
    input_device: Optional[str] = typer.Option(None, "--input-device", help="Capture device: index or part of its name (see --list-devices)."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List capture devices and exit."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask about each utterance [default: transcribe it]."),
    transcribe: bool = typer.Option(False, "--transcribe", help="Live transcription (the official speech-recognition prompt)."),
    duration: Optional[float] = typer.Option(None, "--duration", min=0.0, help="Stop after this many seconds of audio."),
    repetition_guard: Optional[bool] = typer.Option(None, "--repetition-guard/--no-repetition-guard",
                                                    help="Stop an answer that starts repeating itself and keep its "
                                                    "first copy [default: the model's own, as salmonn ask]."),
    model: Optional[str] = model_option(),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens per utterance."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (listen has no beam search); > 0 samples."),
    top_p: float = top_p_option(),
    seed: Optional[int] = seed_option(),
    threads: Optional[int] = threads_option(),
    device: str = device_option(),
    n_gpu_layers: Optional[int] = gpu_layers_option(),
    verbose: bool = verbose_option(),
    lora_scale: Optional[float] = lora_scale_option(),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per utterance."),
) -> None:
    """Answer each utterance heard on the microphone (cut by a voice-activity detector); Ctrl-C stops."""
    from salmonn_cli import listen as live
    from salmonn_cli.decoding import DecodingOptions
    from salmonn_cli.default_model import resolve_model_dir
    from salmonn_cli.pipeline import Pipeline

    if list_devices:
        devices = live.input_devices()
        if not devices:
            print("salmonn: no capture devices found", file=sys.stderr)
        for d in devices:
            print(f"{d['index']:>3}  {d['name']}  ({d['hostapi']}, {d['channels']} ch, {d['default_samplerate']:g} Hz)")
        return
    if mic and input_path:
        raise SalmonnError("give either --mic or --input, not both")
    check_model_option(model)
    options = live.ListenOptions(prompt=live.resolve_prompt(prompt, transcribe), device=live.parse_device(input_device),
                                 input_path=input_path, speed=speed, max_seconds=duration,
                                 repetition_guard=repetition_guard)
    decoding = DecodingOptions(max_tokens=max_tokens, beams=1, temperature=temperature, top_p=top_p, seed=seed)
    runtime = runtime_options(threads, device, n_gpu_layers, lora_scale, None)

    def on_heard(heard) -> None:
        print(json.dumps(heard.to_dict(), ensure_ascii=False) if as_json else live.format_heard(heard), flush=True)

    with Pipeline(resolve_model_dir(model), runtime, decoding) as pipeline:
        report_placement(pipeline, verbose)
        live.listen(pipeline, options, on_heard=on_heard,
                    log=lambda m: print(f"salmonn: {m}", file=sys.stderr, flush=True))


# --- serve ---------------------------------------------------------------------------------------

SERVE_EXTRA_HINT = "salmonn serve needs the serve extra: pip install 'salmonn[serve]'"


@app.command()
def serve(
    model: Optional[str] = model_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; "
                             "then also give --api-key)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port (0: any free one, printed at start)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SALMONN_API_KEY", help="Require "
                                          "`Authorization: Bearer KEY` on every /v1 route [env: SALMONN_API_KEY]."),
    max_upload_mb: float = typer.Option(100.0, "--max-upload-mb", min=0.001, help="Largest request body in MB "
                                        "(413 beyond; the audio is held in memory, never written to disk)."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait while one is answered "
                              "(503 with Retry-After beyond)."),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens an answer (or a transcription "
                                   "chunk) may have; also the default when a request gives none."),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, max=MAX_BEAMS, help="Beam search for requests "
                                        "that ask for none, and the most beams a request may ask for "
                                        "[default: the model's own, from its manifest]."),
    threads: Optional[int] = threads_option(),
    device: str = device_option(),
    n_gpu_layers: Optional[int] = gpu_layers_option(),
    verbose: bool = verbose_option(),
    lora_scale: Optional[float] = lora_scale_option(),
    context: Optional[int] = context_option(),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat with audio, transcriptions,
    translations) and a page to use it in a browser, at http://127.0.0.1:8080/."""
    try:
        from salmonn_cli.serve.server import ServeOptions, serve as run_server
    except ImportError as e:
        if e.name in ("starlette", "uvicorn", "multipart", "python_multipart"):
            raise SalmonnError(SERVE_EXTRA_HINT) from None
        raise
    from salmonn_cli.decoding import DecodingOptions

    check_model_option(model)
    if api_key is not None and not api_key.strip():
        raise SalmonnError("--api-key is empty")
    runtime = runtime_options(threads, device, n_gpu_layers, None, context)
    options = ServeOptions(host=host, port=port, api_key=api_key, max_upload_mb=max_upload_mb, queue=queue,
                           decoding=DecodingOptions(max_tokens=max_tokens, beams=beams), lora_scale=lora_scale)
    raise typer.Exit(run_server(model, runtime, options, notice=notice,
                                on_loaded=lambda pipeline: report_placement(pipeline, verbose)))


@app.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def export(ctx: typer.Context) -> None:
    """Convert a SALMONN checkpoint into an ONNX audio encoder + GGUF LLM model directory."""
    # the PyTorch side's own command (export/__main__.py) takes every argument, --help too
    from salmonn_cli.training_side import become_module, missing_training_module

    missing = missing_training_module()
    if missing:
        raise SalmonnError(f"salmonn export needs the training extras ({missing} is missing): "
                           "pip install 'salmonn[train]' (or `make setup`)")
    become_module("export", ctx.args)


def main() -> None:
    sys.exit(run())


def run(command: typer.Typer = app, prog_name: str | None = None) -> int:
    """The command's exit code; every failure is one line on stderr, never a traceback. (`command`: also
    the PyTorch side's own commands, run as programs of their own.)"""
    debug = bool(os.environ.get(DEBUG_ENV))
    stdout_guard.install()
    try:
        # without standalone mode click returns (not raises) the code of a typer.Exit
        code = command(standalone_mode=False, prog_name=prog_name)
        if code == INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
            print("\nsalmonn: interrupted", file=sys.stderr)
        sys.stdout.flush()       # a write error still pending is reported here, not at exit
        return code if isinstance(code, int) else 0
    except (stdout_guard.StdoutClosed, BrokenPipeError):   # `salmonn ... | head -1`: the reader has all it wanted
        stdout_guard.discard_unwritten()
        return BROKEN_PIPE
    except SalmonnError as e:
        if isinstance(e, OutputError):
            stdout_guard.discard_unwritten()
        if not isinstance(e, ReportedError):
            say("error: ", str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print("\nsalmonn: interrupted", file=sys.stderr)
        return INTERRUPTED
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors (typer's click) and anything unexpected: no traceback
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            say("error: ", f"{' '.join(e.format_message().split())}{hint}")
            return e.exit_code
        if type(e).__name__ == "Abort":
            print("\nsalmonn: interrupted", file=sys.stderr)
            return INTERRUPTED
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        say("internal error: ", f"{type(e).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)")
        return 1


if __name__ == "__main__":
    main()
