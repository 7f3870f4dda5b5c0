"""The `salmonn` command line. Heavy modules are imported inside the commands that need them:
`ask` never imports torch; `export` does."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from salmonn_cli.errors import SalmonnError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Ask questions about audio on your own machine (SALMONN: Whisper + BEATs + a LLaMA LLM).",
)

DEBUG_ENV = "SALMONN_DEBUG"


def warn(message: str) -> None:
    print(f"salmonn: warning: {message}", file=sys.stderr, flush=True)


@app.command()
def ask(
    audio: str = typer.Argument(..., help="Audio file (wav, flac, ogg, mp3, ...; any rate, any channels)."),
    prompt: str = typer.Argument(..., help='What to ask, e.g. "Describe the audio."'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory from `salmonn export` "
                                        "[default: $SALMONN_MODEL]."),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads [default: half the cores]."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", min=-1, help="LLM layers to offload to the GPU (-1 = all)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run the audio encoder on the CPU even if CUDA is available."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Answer a question about an audio clip."""
    from salmonn_cli.decoding import DecodingOptions
    from salmonn_cli.pipeline import Pipeline, RuntimeOptions

    options = RuntimeOptions(n_gpu_layers=n_gpu_layers, use_gpu=not cpu)
    if threads:
        options.n_threads = threads
    decoding = DecodingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with Pipeline(model, options, max_tokens=max_tokens) as pipeline:
        audio_input = pipeline.embed_audio(audio)
        if audio_input.truncated:
            warn(f"{audio} is {audio_input.seconds:.1f} s long; only the first "
                 f"{pipeline.config.max_seconds:g} s are used")

        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        answer = pipeline.answer(audio_input.embeds, prompt, decoding, on_text=None if as_json else stream)
    if as_json:
        n = len(answer.tokens)
        print(json.dumps({
            "text": answer.text,
            "tokens": answer.tokens,
            "stop_reason": answer.stop_reason,
            "audio": audio,
            "audio_seconds": round(audio_input.seconds, 3),
            "truncated": audio_input.truncated,
            "prompt_tokens": answer.prompt_tokens,
            "quant": pipeline.manifest.quant,
            "encoder_provider": pipeline.encoder.provider,
            "timings": {
                "audio_load_s": round(audio_input.load_s, 4),
                "encoder_s": round(audio_input.encode_s, 4),
                "prefill_s": round(answer.prefill_s, 4),
                "decode_s": round(answer.decode_s, 4),
                "decode_tokens_per_s": round(n / answer.decode_s, 2) if n and answer.decode_s > 0 else None,
            },
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to create."),
    official_ckpt: Optional[Path] = typer.Option(None, "--official-ckpt", help="Official checkpoint "
                                                 "(salmonn_v1.pth / salmonn_7b_v0.pth)."),
    whisper: Optional[Path] = typer.Option(None, "--whisper", help="HF whisper directory (whisper-large-v2)."),
    beats: Optional[Path] = typer.Option(None, "--beats", help="BEATs checkpoint (.pt)."),
    llm: Optional[Path] = typer.Option(None, "--llm", help="HF Vicuna/LLaMA directory."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint whose config names "
                                              "its Whisper, BEATs and LLM paths (ours, or official-format)."),
    quant: str = typer.Option("q4_k_m", "--quant", "-q", help="f32, f16, q8_0, q4_k_m, ..."),
    qformer_heads: Optional[int] = typer.Option(None, "--qformer-heads", min=1,
                                                help="Q-Former attention heads [default: hidden/64]."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Convert a SALMONN checkpoint into an ONNX audio encoder + GGUF LLM model directory."""
    from export.export import checkpoint_sources, export_model

    if checkpoint and official_ckpt:
        raise SalmonnError("give either --checkpoint or --official-ckpt, not both")
    if checkpoint:
        if not checkpoint.is_file():
            raise SalmonnError(f"checkpoint not found: {checkpoint}")
        sources = checkpoint_sources(checkpoint)
        whisper = whisper or sources["whisper"]
        beats = beats or sources["beats"]
        llm = llm or sources["llm"]
        ckpt = checkpoint
    elif official_ckpt:
        missing = [flag for flag, v in (("--whisper", whisper), ("--beats", beats), ("--llm", llm)) if v is None]
        if missing:
            raise SalmonnError(f"--official-ckpt needs {', '.join(missing)}")
        ckpt = official_ckpt
    else:
        raise SalmonnError("give --official-ckpt (with --whisper, --beats, --llm) or --checkpoint")
    export_model(ckpt=ckpt, whisper=whisper, beats=beats, llm=llm, out=out, quant=quant, force=force,
                 qformer_heads=qformer_heads, log=lambda m: print(m, file=sys.stderr))


def main() -> None:
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        app(standalone_mode=False)
    except SalmonnError as e:
        print(f"salmonn: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("\nsalmonn: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors (typer's click) and anything unexpected: no traceback
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            print("\nsalmonn: interrupted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"salmonn: internal error: {type(e).__name__}: {message} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
