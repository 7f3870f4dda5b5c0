"""What the pipeline benchmark runs on, built once and cached under a work directory.

    WORK/clips/clip-<N>s.wav               real speech and sound from ../shared/fixtures/audio, cut to N s
    WORK/<shape>/official/                 official-format SALMONN files with random weights (full mode)
    WORK/<shape>/model-<quant>/            `salmonn export` output, one model directory per quantization
    WORK/nano-data-{seed0,quick}/          the salmonn-nano held-out set (train/nano/make_data.py)

Quick mode benchmarks the shipped official-tiny fixture itself; full mode builds a model with the real
Whisper large-v2, BEATs iter3 and Q-Former shapes and a Vicuna-layout LLaMA (`bench_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salmonn_cli.config import SalmonnConfig
from train.presets import official_7b
from salmonn_cli.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SALMONN_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"
AUDIO_FIXTURES = FIXTURES / "audio"
DEFAULT_WORK = Path.home() / ".cache" / "salmonn" / "bench"

SAMPLE_RATE = 16000
# Real clips joined into the benchmark clip (narration, speech over gunfire, two short utterances).
CLIP_SOURCES = ("narration-moon-landing.mp3", "gunshots.wav", "mountain.wav", "excitement.wav")
BUILD_SEED = 0
BUILD_MARKER = "bench-build.json"
MANIFEST_NAME = "salmonn.json"
ENCODER_ONNX = "audio_encoder.onnx"
FIXTURE_SHAPE = "official-tiny"
# Vicuna layout (MHA, vocab 32000, SiLU MLP, RMSNorm) at ~1.3B parameters: what fits a 24 GiB machine
# in f32 for the PyTorch reference. The width/depth/MLP ratio is TinyLlama's, without its GQA.
LLM_1B = {"hidden_size": 2048, "n_layers": 22, "n_heads": 16, "n_kv_heads": 16, "intermediate_size": 5632}
LLM_SHAPES = ("1b", "7b")


def bench_config(llm_shape: str) -> SalmonnConfig:
    """SALMONN-7B's encoders, Q-Former, LoRA and prompt; its Vicuna-7B LLM, or the ~1B Vicuna-layout one."""
    if llm_shape not in LLM_SHAPES:
        raise ValueError(f"unknown LLM shape {llm_shape!r}; choose one of {', '.join(LLM_SHAPES)}")
    config = official_7b()
    if llm_shape == "1b":
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, **LLM_1B))
    return config


def llm_parameter_count(config: SalmonnConfig) -> int:
    d = config.llm
    kv_width = d.n_kv_heads * d.head_dim
    per_layer = (2 * d.hidden_size * d.hidden_size + 2 * d.hidden_size * kv_width
                 + 3 * d.hidden_size * d.intermediate_size + 2 * d.hidden_size)
    embeddings = d.vocab_size * d.hidden_size * (1 if d.tie_word_embeddings else 2)
    return d.n_layers * per_layer + embeddings + d.hidden_size


# --- official-format inputs ----------------------------------------------------------------------

@dataclass
class OfficialPaths:
    ckpt: Path
    whisper: Path
    beats: Path
    llm: Path


def fixture_official() -> OfficialPaths:
    return OfficialPaths(OFFICIAL_TINY / "salmonn_tiny.pth", OFFICIAL_TINY / "whisper",
                         OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna")


def build_official(root: Path, config: SalmonnConfig, log=print) -> OfficialPaths:
    """Random-weight official-format files of `config` in `root` (kept while the config is the same)."""
    sys.path.insert(0, str(REPO / "tests"))
    from official_format import OtherShapes, build_official_model

    marker = root / BUILD_MARKER
    wanted = {"config": config.to_dict(), "seed": BUILD_SEED}
    files = OfficialPaths(root / "salmonn.pth", root / "whisper", root / "beats.pt", root / "vicuna")
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return files
    log(f"building official-format random-weight files in {root} (once)")
    # model directories exported from older files are stale now
    for stale in root.parent.glob("model-*"):
        shutil.rmtree(stale)
    shutil.rmtree(root, ignore_errors=True)
    shapes = OtherShapes(whisper=config.whisper, beats=config.beats, qformer=config.qformer, llm=config.llm,
                         lora=config.lora, second_per_window=config.second_per_window,
                         second_stride=config.second_stride)
    built = build_official_model(root, shapes, OFFICIAL_TINY / "vicuna", seed=BUILD_SEED, old_lora_keys=False)
    assert (built.ckpt, built.whisper, built.beats, built.llm) == (files.ckpt, files.whisper, files.beats, files.llm)
    marker.write_text(json.dumps(wanted))
    return files


def encoder_config() -> SalmonnConfig:
    """SALMONN-7B's encoders and Q-Former; a one-layer LLM (only its width reaches the encoder export)."""
    config = bench_config("7b")
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, n_layers=1))


def real_shape_encoder(work: Path, log=print) -> tuple[OfficialPaths, Path]:
    """The random-weight official-format files of `encoder_config` in WORK/enc/official and their audio
    encoder exported to ONNX (export.onnx_encoder, fp32) in WORK/enc/onnx/, each built once."""
    official = build_official(work / "enc" / "official", encoder_config(), log)
    onnx_dir = work / "enc" / "onnx"
    if not (onnx_dir / ENCODER_ONNX).is_file():
        from export.onnx_encoder import export_audio_encoder
        from train.model import AudioEncoder
        from train.official import load_official

        log("exporting the real-shape audio encoder to ONNX (once)")
        tmp = work / "enc" / "onnx.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model, config = load_official(official.ckpt, official.whisper, official.beats, official.llm, llm_weights=False)
        export_audio_encoder(AudioEncoder(model), config, tmp / ENCODER_ONNX)
        del model
        shutil.rmtree(onnx_dir, ignore_errors=True)
        os.replace(tmp, onnx_dir)
    return official, onnx_dir / ENCODER_ONNX


# --- model directories ---------------------------------------------------------------------------

def export_base(official: OfficialPaths, out: Path, quant: str, log=print) -> Path:
    """`salmonn export` (our exporter) of `official` as `quant`, unless already there."""
    from export.export import export_model

    if (out / MANIFEST_NAME).is_file():
        return out
    log(f"exporting {out.name} with salmonn export (once)")
    export_model(ckpt=official.ckpt, whisper=official.whisper, beats=official.beats, llm=official.llm,
                 out=out, quant=quant, log=log)
    return out


def derive_quant(base: Path, quant: str, out: Path, log=print) -> Path:
    """The model directory `base` with its GGUF re-quantized by llama.cpp (what `salmonn export --quant`
    does from the same f16/f32 GGUF); the encoder and adapter files are hard links, not copies."""
    from export.export import llm_file_name
    from export.quantize import quantize_gguf
    from salmonn_cli.manifest import sha256_of

    if (out / MANIFEST_NAME).is_file():
        return out
    log(f"quantizing {base.name} to {quant} (once)")
    manifest = json.loads((base / MANIFEST_NAME).read_text())
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        for name, info in manifest["files"].items():
            if name != manifest["llm"]:
                os.link(base / name, tmp / name)
                files[name] = info
        gguf = llm_file_name(quant)
        quantize_gguf(base / manifest["llm"], tmp / gguf, quant)
        files[gguf] = {"sha256": sha256_of(tmp / gguf), "size": (tmp / gguf).stat().st_size}
        manifest.update(llm=gguf, quant=quant, files=dict(sorted(files.items())))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_dirs(official: OfficialPaths, root: Path, base_quant: str, quants: tuple[str, ...],
               log=print) -> dict[str, Path]:
    """quant -> model directory, for `base_quant` (exported) and each of `quants` (derived from it)."""
    base = export_base(official, root / f"model-{base_quant}", base_quant, log)
    dirs = {base_quant: base}
    for quant in quants:
        if quant != base_quant:
            dirs[quant] = derive_quant(base, quant, root / f"model-{quant}", log)
    return dirs


# --- audio ---------------------------------------------------------------------------------------

def make_clip(work: Path, seconds: float) -> Path:
    """A `seconds`-long 16 kHz mono WAV of real audio: the fixture clips back to back, cut."""
    import soundfile as sf

    from salmonn_cli.audio import load_audio

    out = work / "clips" / f"clip-{seconds:g}s.wav"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    wave = np.concatenate([load_audio(AUDIO_FIXTURES / name, SAMPLE_RATE) for name in CLIP_SOURCES])
    n = int(round(seconds * SAMPLE_RATE))
    if len(wave) < n:
        raise RuntimeError(f"the fixture clips hold {len(wave) / SAMPLE_RATE:.1f} s, less than {seconds:g} s")
    tmp = out.with_suffix(".tmp.wav")
    sf.write(tmp, np.clip(wave[:n], -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, out)
    return out


def nano_data(work: Path, quick: bool, log=print) -> Path:
    """The salmonn-nano data set of seed 0 (its test.json is the held-out set), made once."""
    from train.nano.data import make_dataset

    out = work / ("nano-data-quick" if quick else "nano-data-seed0")
    if (out / "dataset.json").is_file() and (out / "test.json").is_file():
        return out
    log(f"making the salmonn-nano data set in {out} (once{'' if quick else '; a few minutes'})")
    make_dataset(out, seed=0, quick=quick)
    return out


# --- everything at once (runs in its own process: it imports torch) -----------------------------

@dataclass
class Artefacts:
    shape: str                        # "official-tiny", "vicuna-1b" or "vicuna-7b"
    config: SalmonnConfig
    official: OfficialPaths           # the files the PyTorch reference loads
    models: dict[str, Path]           # quant -> model directory of the benchmarked model
    fixture_models: dict[str, Path]   # quant -> model directory of the official-tiny fixture
    clip: Path


def prepare(work: Path, quick: bool, llm_shape: str, quants: tuple[str, ...], clip_seconds: float,
            fixture_quants: tuple[str, ...]) -> Artefacts:
    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    fixture_models = model_dirs(fixture_official(), work / FIXTURE_SHAPE, "f32", fixture_quants, log)
    if quick:
        shape, official = FIXTURE_SHAPE, fixture_official()
        models = {q: fixture_models[q] for q in quants}
    else:
        shape = f"vicuna-{llm_shape}"
        official = build_official(work / shape / "official", bench_config(llm_shape), log)
        models = model_dirs(official, work / shape, "f16", quants, log)
        models = {q: models[q] for q in quants}
    # the shapes as exported (the fixture's Q-Former, for one, is bert-base, not the `tiny()` preset's)
    config = load_manifest(models[quants[0]], verify=False).config
    return Artefacts(shape, config, official, models, fixture_models, make_clip(work, clip_seconds))
