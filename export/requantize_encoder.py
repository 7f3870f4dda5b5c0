"""`salmonn export --requantize-encoder DIR --encoder-quant Q`: switch an exported model directory's audio
encoder to Q without re-exporting the LLM.

The int8 encoder is made from the fp32 one, which stays in the directory (still listed in the manifest),
so switching back is only a manifest change. The new encoder and then the manifest are each written
under a temporary name and renamed: an interrupted run leaves the directory as it was, or with an extra
file the manifest does not name yet.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.errors import SalmonnError, quoted
from salmonn_cli.manifest import MANIFEST_NAME, file_entry, load_manifest


def requantize_encoder(model_dir: Path, encoder_quant: str, log=print) -> Path:
    from export.encoder_quant import ENCODER_QUANTS, FP32_ENCODER_FILE, encoder_file_name, quantize_encoder

    if encoder_quant not in ENCODER_QUANTS:
        raise SalmonnError(f"unknown encoder quantization {encoder_quant!r}; choose one of {', '.join(ENCODER_QUANTS)}")
    manifest = load_manifest(model_dir)     # every listed file checked against its sha256
    if manifest.encoder_quant == encoder_quant:
        log(f"{model_dir}: the audio encoder is already {encoder_quant}")
        return model_dir
    if FP32_ENCODER_FILE not in manifest.files:
        raise SalmonnError(f"{quoted(model_dir)} has no fp32 audio encoder ({FP32_ENCODER_FILE}) to make a "
                           f"{encoder_quant} one from: export the model again with --encoder-quant {encoder_quant}")
    started = time.time()
    target = encoder_file_name(encoder_quant)
    if target not in manifest.files:
        quantize_encoder(manifest.path(FP32_ENCODER_FILE), manifest.path(target))
    d = json.loads(manifest.path(MANIFEST_NAME).read_text(encoding="utf-8"))
    d["files"] = dict(sorted({**d["files"], target: file_entry(manifest.path(target))}.items()))
    d.update(audio_encoder=target, encoder_quant=encoder_quant)
    with atomic_file(manifest.path(MANIFEST_NAME), text=True) as f:
        f.write(json.dumps(d, indent=2) + "\n")
    log(f"{model_dir}: audio encoder {manifest.encoder_quant} -> {encoder_quant} ({target}) "
        f"in {time.time() - started:.1f} s")
    return model_dir

