"""`salmonn export`: a trained SALMONN checkpoint -> a model directory the runtime can load.

    out/
      audio_encoder.onnx   Whisper + BEATs + fusion + window Q-Former + projection, fp32
                           (audio_encoder-int8.onnx instead with --encoder-quant int8)
      llm-<quant>.gguf     LLaMA with the LoRA merged, tokenizer included, quantized by llama.cpp
      lora-adapter.gguf    the same LoRA as an f32 llama.cpp adapter, for `--lora-scale`
      salmonn.json         the manifest: config, file names, sha256 of every file

Everything is written into a hidden temporary directory beside `out`, which is renamed into
place at the very end: an interrupted or failed export leaves no model directory behind.
"""
from __future__ import annotations

import glob
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from salmonn_cli.errors import SalmonnError
from salmonn_cli.manifest import MANIFEST_NAME, manifest_dict

LORA_ADAPTER_FILE = "lora-adapter.gguf"


def llm_file_name(quant: str) -> str:
    return f"llm-{quant}.gguf"


@contextmanager
def staging_dir(out: Path):
    """A temporary directory beside `out`, removed unless the body renames it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out, "partial")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_leftovers(out: Path, kind: str) -> None:
    """Hidden `.partial-PID` (staging) or `.old-PID` (replaced by --force) directories of `out`
    that an export killed half way (SIGKILL, power loss) left behind, once their process is gone."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise SalmonnError(f"{out} already exists; pass --force to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    # a killed --force export may have left the previous model aside; `out` is complete again now
    remove_stale_leftovers(out, "old")


def export_model(*, ckpt: Path, whisper: Path, beats: Path, llm: Path, out: Path, quant: str,
                 force: bool = False, qformer_heads: int | None = None, default_beams: int = 1,
                 tasks: list[str] | None = None, encoder_quant: str | None = None,
                 repetition_guard: bool = False, log=print) -> Path:
    """`default_beams`, `repetition_guard`: the decoding the manifest names as the model's own.
    `encoder_quant`: fp32 (the exported graph) or int8 (export/encoder_quant.py; the fp32 file is
    not kept); None: int8 with an integer-quantized LLM, fp32 with f32 or f16 (`default_encoder_quant`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from export.encoder_quant import (ENCODER_QUANTS, FP32_ENCODER_FILE, default_encoder_quant, encoder_file_name,
                                      quantize_encoder)
    from export.gguf import official_lora_pairs, write_llama_gguf, write_lora_adapter_gguf
    from export.onnx_encoder import export_audio_encoder
    from export.quantize import QUANT_TYPES, quantize_gguf
    from train.model import AudioEncoder
    from train.official import load_official

    if quant not in QUANT_TYPES:
        raise SalmonnError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    if encoder_quant is None:
        encoder_quant = default_encoder_quant(quant)
    if encoder_quant not in ENCODER_QUANTS:
        raise SalmonnError(f"unknown encoder quantization {encoder_quant!r}; choose one of {', '.join(ENCODER_QUANTS)}")
    for label, path in (("checkpoint", ckpt), ("Whisper directory", whisper),
                        ("BEATs checkpoint", beats), ("LLM directory", llm)):
        if not Path(path).exists():
            raise SalmonnError(f"{label} not found: {path}")
    if out.exists() and not force:
        raise SalmonnError(f"{out} already exists; pass --force to replace it")

    started = time.time()
    with staging_dir(out) as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), transient=True,
    ) as progress:
        step = progress.add_task("loading the PyTorch model", total=None)
        model, config = load_official(ckpt, whisper, beats, llm, qformer_heads=qformer_heads,
                                      llm_weights=False)   # the GGUF writer reads the LLM itself
        progress.update(step, description="exporting the audio encoder to ONNX")
        export_audio_encoder(AudioEncoder(model), config, tmp / FP32_ENCODER_FILE)
        lora = official_lora_pairs(model.trainable_state_dict())
        del model
        if encoder_quant != "fp32":
            progress.update(step, description=f"quantizing the audio encoder to {encoder_quant}")
            quantize_encoder(tmp / FP32_ENCODER_FILE, tmp / encoder_file_name(encoder_quant))
            remove_onnx(tmp / FP32_ENCODER_FILE)
        progress.remove_task(step)

        gguf_type = "f32" if quant == "f32" else "f16"
        unquantized = tmp / llm_file_name(gguf_type)
        tensors = progress.add_task(f"writing the {gguf_type} GGUF (LoRA merged)", total=None)

        def on_tensor(done: int, total: int) -> None:
            progress.update(tensors, completed=done, total=total)

        write_llama_gguf(unquantized, llm, config.llm, lora, config.lora.scale, gguf_type,
                         progress=on_tensor)
        progress.remove_task(tensors)
        # The merged GGUF is the fast default; the adapter re-weights the LoRA at run time.
        write_lora_adapter_gguf(tmp / LORA_ADAPTER_FILE, config.llm, lora,
                                merged_scale=config.lora.scale, name=f"{Path(ckpt).stem} LoRA")
        if quant != gguf_type:
            q = progress.add_task(f"quantizing to {quant} with llama.cpp", total=None)
            quantize_gguf(unquantized, tmp / llm_file_name(quant), quant)
            unquantized.unlink()
            progress.remove_task(q)

        manifest = manifest_dict(config, encoder_file_name(encoder_quant), llm_file_name(quant), quant, tmp,
                                 extra={"lora_adapter": LORA_ADAPTER_FILE,
                                        "source": {"checkpoint": Path(ckpt).name,
                                                   "lora_scale": config.lora.scale}},
                                 default_beams=default_beams, tasks=tasks, encoder_quant=encoder_quant,
                                 repetition_guard=repetition_guard)
        _write_json(tmp / MANIFEST_NAME, manifest)
        publish(tmp, out, force)
    log(f"exported {out} ({quant}, {encoder_quant} audio encoder) in {time.time() - started:.1f} s")
    return out


def remove_onnx(path: Path) -> None:
    """An ONNX graph and its external weights file (`<name>.data`, export/onnx_encoder.py)."""
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    import json

    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
