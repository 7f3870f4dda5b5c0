"""Fuzzing the readers of untrusted files with hypothesis: whatever the bytes, the audio reader
(`audio.load_audio`, and `chunks.iter_chunks` that `ask`/`transcribe` stream through) and the
manifest parser (`manifest.load_manifest`) either return a usable result or raise a SalmonnError
subclass, never another exception.

Inputs: arbitrary bytes; valid files of several formats with a few bytes overwritten or cut short;
RIFF/WAVE headers with arbitrary fields (channels, rate, codec, sizes); arbitrary JSON; a valid
manifest with one value replaced by arbitrary JSON or removed.

Bounded for CI: FUZZ_EXAMPLES examples per test with a fixed seed (derandomized), about 20 s in all
on two busy cores. Set SALMONN_FUZZ_EXAMPLES=N to run N examples per test with fresh randomness.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from salmonn_cli.audio import SAMPLE_RATE, load_audio
from salmonn_cli.audio_input import MemoryAudio
from salmonn_cli.chunks import CHUNK_SECONDS, iter_chunks
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.errors import AudioError, ModelError, SalmonnError
from salmonn_cli.manifest import MANIFEST_NAME, Manifest, check_config, load_manifest, manifest_dict
from train.presets import tiny

FUZZ_EXAMPLES = int(os.environ.get("SALMONN_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                derandomize="SALMONN_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MAX_RAW_BYTES = 4096
MAX_MUTATIONS = 8
SEED_SECONDS = 0.25
# Hypothesis writes each example here: a per-session folder (function-scoped tmp_path does not
# mix with @given).
FUZZ_FILE = "input"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- audio ---------------------------------------------------------------------------------------

def encoded(rate: int, channels: int, **kw) -> bytes:
    t = np.arange(int(SEED_SECONDS * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(wave[:, None], channels, axis=1), rate, **kw)
    return buffer.getvalue()


def seed_files() -> list[bytes]:
    """Small valid files of the formats users bring (those this libsndfile can write)."""
    specs = [(16000, 1, dict(format="WAV", subtype="PCM_16")), (44100, 2, dict(format="WAV", subtype="FLOAT")),
             (8000, 6, dict(format="WAV", subtype="PCM_U8")), (48000, 1, dict(format="WAV", subtype="PCM_24")),
             (22050, 1, dict(format="FLAC")), (16000, 1, dict(format="OGG", subtype="VORBIS")),
             (16000, 1, dict(format="MP3")), (16000, 1, dict(format="AIFF", subtype="PCM_16"))]
    seeds = []
    for rate, channels, kw in specs:
        try:
            seeds.append(encoded(rate, channels, **kw))
        except (sf.LibsndfileError, TypeError, ValueError):
            pass      # not every libsndfile writes mp3
    return seeds


SEEDS = seed_files()


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, MAX_MUTATIONS))):
        # headers are where parsers go wrong: bias positions to the first 64 bytes
        limit = draw(st.sampled_from([64, len(data)]))
        position = draw(st.integers(0, min(limit, len(data)) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def riff_headers(draw) -> bytes:
    """RIFF/WAVE with an arbitrary fmt chunk (codec, channels, rate, alignment, bits) and data size."""
    codec = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE]) | U16)
    channels = draw(st.sampled_from([0, 1, 2, 6, 255]) | U16)
    rate = draw(st.sampled_from([0, 1, 8000, 16000, 44100, 192000, 0xFFFFFFFF]) | U32)
    bits = draw(st.sampled_from([0, 8, 16, 24, 32, 64]) | U16)
    align = draw(st.just(max(1, channels * bits // 8) & 0xFFFF) | U16)
    byte_rate = draw(st.just(rate * align & 0xFFFFFFFF) | U32)
    body = draw(st.binary(max_size=1024))
    data_size = draw(st.just(len(body)) | U32)
    fmt = struct.pack("<HHIIHH", codec, channels, rate, byte_rate, align, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + body
    riff_size = draw(st.just(4 + len(chunks)) | U32)
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + chunks


AUDIO_BYTES = st.binary(max_size=MAX_RAW_BYTES) | mutated_files() | riff_headers()


def check_wave(wave: np.ndarray) -> None:
    assert wave.ndim == 1 and wave.dtype == np.float64 and wave.size > 0
    assert np.isfinite(wave).all()


@FUZZ
@given(data=AUDIO_BYTES)
@example(data=b"")
@example(data=b"RIFF\x24\x00\x00\x00WAVEfmt ")
def test_load_audio_returns_a_wave_or_an_audio_error(work, data):
    path = work / FUZZ_FILE
    path.write_bytes(data)
    try:
        wave = load_audio(path)
    except AudioError:
        return
    check_wave(wave)


@FUZZ
@given(data=AUDIO_BYTES)
def test_streamed_chunks_or_an_audio_error(data, monkeypatch):
    # the path of `ask -` / `transcribe -`: standard input in memory, read block by block.
    # An exception inside libsndfile's I/O callbacks cannot propagate; Python prints it instead.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        chunks = list(iter_chunks(MemoryAudio(data, "<stdin>")))
    except AudioError:
        chunks = None
    assert unraisable == []
    if chunks is None:
        return
    assert chunks
    for chunk in chunks:
        check_wave(chunk.wave)
        assert len(chunk.wave) <= CHUNK_SECONDS * SAMPLE_RATE


# --- manifest ------------------------------------------------------------------------------------

MODEL_FILES = {"audio_encoder.onnx": b"onnx", "llm-f32.gguf": b"gguf", "lora-adapter.gguf": b"lora"}


@pytest.fixture(scope="module")
def manifest_base(work) -> dict:
    """A valid manifest (tiny config) over small stand-in model files (sha256 only checks bytes)."""
    model = work / "model"
    model.mkdir()
    for name, content in MODEL_FILES.items():
        (model / name).write_bytes(content)
    return manifest_dict(tiny(), "audio_encoder.onnx", "llm-f32.gguf", "f32", model,
                         extra={"lora_adapter": "lora-adapter.gguf"})


def json_values(max_leaves: int = 12):
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2, 4096)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=max_leaves)


def value_paths(value, prefix=()) -> list[tuple]:
    """Every key path in a JSON document (objects and lists), the root excluded."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        paths.append(prefix + (key,))
        paths += value_paths(child, prefix + (key,))
    return paths


@st.composite
def edited_manifests(draw, base: dict) -> dict:
    """The valid manifest with 1-3 values replaced by arbitrary JSON or removed."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = value_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 3)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values())
    return doc


def check_manifest(manifest: Manifest, verified: bool) -> None:
    assert isinstance(manifest.config, SalmonnConfig)
    check_config(manifest.config)
    assert manifest.config.n_audio_tokens >= 1 and math.isfinite(manifest.config.lora.scale)
    for name in (manifest.audio_encoder, manifest.llm):
        assert name in manifest.files
        if verified:
            assert manifest.path(name).is_file()


def load_written(work: Path, text: bytes | str, verify: bool):
    model = work / "model"
    path = model / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return load_manifest(model, verify=verify)
    except ModelError:
        return None


@FUZZ
@given(data=st.binary(max_size=MAX_RAW_BYTES) | json_values().map(lambda v: json.dumps(v).encode()))
@example(data=b"[" * 100_000)                   # deeper than the JSON parser recurses
@example(data=b"1" * 5000)                      # longer than Python's int conversion limit
@example(data=b"\xff\xfe{}")
def test_manifest_bytes_give_a_manifest_or_a_model_error(work, manifest_base, data):
    manifest = load_written(work, data, verify=True)
    if manifest is not None:
        check_manifest(manifest, verified=True)


@FUZZ
@given(data=st.data())
def test_edited_manifest_gives_a_manifest_or_a_model_error(work, manifest_base, data):
    doc = data.draw(edited_manifests(manifest_base))
    verify = data.draw(st.booleans())
    try:
        text = json.dumps(doc)
    except (ValueError, RecursionError):
        return
    manifest = load_written(work, text, verify=verify)
    if manifest is not None:
        check_manifest(manifest, verified=verify)


def test_fuzz_seeds_cover_the_formats():
    # mp3 is optional in libsndfile; the others are always there
    assert len(SEEDS) >= len(["wav16", "wavfloat", "wav8", "wav24", "flac", "ogg", "aiff"])
    with pytest.raises(SalmonnError):
        load_manifest(Path("/nonexistent/model"), verify=False)
