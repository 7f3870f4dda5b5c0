"""`python -m export` (what `salmonn export` runs): a SALMONN checkpoint -> a model directory.

The runtime never imports this side (it needs torch): `salmonn export` starts it as its own program
with the same arguments, and its failures are the CLI's one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from salmonn_cli.beams import MAX_BEAMS
from salmonn_cli.cli import run
from salmonn_cli.errors import SalmonnError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def export(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Model directory to create."),
    official_ckpt: Optional[Path] = typer.Option(None, "--official-ckpt", help="Official checkpoint "
                                                 "(salmonn_v1.pth / salmonn_7b_v0.pth)."),
    whisper: Optional[Path] = typer.Option(None, "--whisper", help="Whisper: an HF directory (whisper-large-v2) or a CTranslate2 model directory / model.bin."),
    beats: Optional[Path] = typer.Option(None, "--beats", help="BEATs checkpoint (.pt)."),
    llm: Optional[Path] = typer.Option(None, "--llm", help="HF Vicuna/LLaMA directory."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint whose config names "
                                              "its Whisper, BEATs and LLM paths (ours, or official-format)."),
    quant: str = typer.Option("q4_k_m", "--quant", "-q", help="f32, f16, q8_0, q4_k_m, ..."),
    qformer_heads: Optional[int] = typer.Option(None, "--qformer-heads", min=1,
                                                help="Q-Former attention heads [default: hidden/64]."),
    default_beams: int = typer.Option(1, "--default-beams", min=1, max=MAX_BEAMS, help="The decoding written into the "
                                      "manifest: what ask and transcribe use without --beams (1 = greedy; 4 = the official)."),
    repetition_guard: bool = typer.Option(False, "--repetition-guard/--no-repetition-guard", help="Written into the "
                                          "manifest: ask cuts a looping answer to its first copy unless given "
                                          "--no-repetition-guard [default: off, as the official SALMONN decodes]."),
    encoder_quant: Optional[str] = typer.Option(None, "--encoder-quant", help="The audio encoder: fp32 or int8 "
                                                "(faster, less exact: README) [default: int8 with a q* --quant, fp32 with f32 or f16]."),
    requantize_encoder: Optional[Path] = typer.Option(None, "--requantize-encoder", help="Instead of exporting: "
                                                      "switch this model directory's audio encoder to --encoder-quant."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Convert a SALMONN checkpoint into an ONNX audio encoder + GGUF LLM model directory."""
    from export.export import export_model
    from train.official import checkpoint_sources

    if requantize_encoder is not None:
        from export.requantize_encoder import requantize_encoder as requantize

        if out or checkpoint or official_ckpt:
            raise SalmonnError("--requantize-encoder changes a model directory in place: give it with "
                               "--encoder-quant only, without --out or a checkpoint")
        if encoder_quant is None:
            raise SalmonnError("--requantize-encoder needs --encoder-quant (fp32 or int8)")
        requantize(requantize_encoder, encoder_quant, log=lambda m: print(m, file=sys.stderr))
        return
    if out is None:
        raise SalmonnError("give --out, the model directory to create")

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
                 qformer_heads=qformer_heads, default_beams=default_beams, encoder_quant=encoder_quant,
                 repetition_guard=repetition_guard, log=lambda m: print(m, file=sys.stderr))


if __name__ == "__main__":
    sys.exit(run(app, prog_name="salmonn export"))
