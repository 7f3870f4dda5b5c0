"""The int8 audio encoder (export/encoder_quant.py) on the official-tiny fixture: exported with
`--encoder-quant int8`, made from an existing directory's fp32 encoder by `salmonn export
--requantize-encoder`, recorded in the manifest with its sha256, and answering like the fp32 encoder.

The fixture's Whisper has two layers, its first and last, which stay fp32: only BEATs' linear layers are
int8 here (test_quantized_layers checks which layers are). Measured on the fixture (f32 LLM, exact
attention): the int8 audio embeddings against fp32 have cosine 0.999998-0.9999998, max |Δ| 0.004-0.005
(values up to 1.9), and the 8 greedy tokens are the official ones. Quality on real shapes and on salmonn-nano's trained weights:
benchmarks/encoder_int8.py and BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import OFFICIAL_TINY, REFERENCE_INPUTS, export_fixture, salmonn
from export.encoder_quant import default_encoder_quant, quantize_encoder
from salmonn_cli import audio
from salmonn_cli.encoder import AudioEncoder
from salmonn_cli.errors import SalmonnError
from salmonn_cli.manifest import load_manifest, sha256_of
from salmonn_cli.pipeline import encoder_inputs
from test_cli import ask_json, one_line_error

INT8_FILE = "audio_encoder-int8.onnx"
FP32_FILE = "audio_encoder.onnx"
MIN_COSINE = 0.99995        # int8 vs fp32 audio embeddings on the fixture's inputs (measured >= 0.999998)
# greedy steps that equal the official tokens with the int8 encoder (measured; of 8)
OFFICIAL_PREFIX = {"speech": 8, "long": 8, "short": 8}
FIRST_TOKEN_MARGIN = 0.02   # the official top two logits of speech_2p5s lie 0.034 apart, short_0p4s 0.27


@pytest.fixture(scope="module")
def model_q8_int8(tmp_path_factory):
    return export_fixture(tmp_path_factory.mktemp("int8") / "tiny-q8_0-int8", "q8_0", "--encoder-quant", "int8")


@pytest.fixture(scope="module")
def model_int8(model_f32, tmp_path_factory):
    """The f32 export with its encoder requantized to int8 (the f32 LLM keeps the official tokens exact)."""
    model = shutil.copytree(model_f32, tmp_path_factory.mktemp("int8") / "tiny-f32-int8")
    r = salmonn("export", "--requantize-encoder", model, "--encoder-quant", "int8")
    assert r.returncode == 0, r.stderr
    assert "fp32 -> int8" in r.stderr
    return model


def test_int8_export_records_the_int8_encoder_and_answers(model_q8_int8, reference):
    manifest = json.loads((model_q8_int8 / "salmonn.json").read_text())
    assert manifest["audio_encoder"] == INT8_FILE and manifest["encoder_quant"] == "int8"
    assert set(manifest["files"]) == {INT8_FILE, "llm-q8_0.gguf", "lora-adapter.gguf"}
    assert manifest["files"][INT8_FILE]["sha256"] == sha256_of(model_q8_int8 / INT8_FILE)
    assert not (model_q8_int8 / FP32_FILE).exists()
    for name, wav in REFERENCE_INPUTS.items():
        # tests/test_cli.py asserts the official first token of the q8_0 export with the fp32 encoder.
        # Two roundings at once (int8 audio, q8_0 LLM) may swap the official top two where their logits
        # lie closer than FIRST_TOKEN_MARGIN (long_40s: 0.0098 apart)
        out = ask_json(model_q8_int8, OFFICIAL_TINY / wav, "--truncate")
        logits = reference[f"{name}.last_logits"].ravel()
        top2 = np.argsort(logits)[::-1][:2]
        if logits[top2[0]] - logits[top2[1]] > FIRST_TOKEN_MARGIN:
            assert out["tokens"][0] == reference[f"{name}.greedy_ids"][0, 1] == top2[0]
        else:
            assert out["tokens"][0] in top2.tolist()


def test_the_llm_quantization_picks_the_default_encoder(model_f32, model_q8):
    """f32 (the exact path) keeps the fp32 encoder; an integer-quantized LLM gets the int8 one."""
    for model, encoder_quant, name in ((model_f32, "fp32", FP32_FILE), (model_q8, "int8", INT8_FILE)):
        manifest = json.loads((model / "salmonn.json").read_text())
        assert manifest["audio_encoder"] == name and manifest["encoder_quant"] == encoder_quant
        assert set(manifest["files"]) == {name, f"llm-{manifest['quant']}.gguf", "lora-adapter.gguf"}
    assert [default_encoder_quant(q) for q in ("f32", "f16", "q8_0", "q5_k_m", "q4_k_m")] == \
        ["fp32", "fp32", "int8", "int8", "int8"]


def test_requantize_adds_the_int8_encoder_and_keeps_the_fp32_one(model_f32, model_int8):
    before = json.loads((model_f32 / "salmonn.json").read_text())
    after = json.loads((model_int8 / "salmonn.json").read_text())
    assert after["audio_encoder"] == INT8_FILE and after["encoder_quant"] == "int8"
    assert after["files"][INT8_FILE]["sha256"] == sha256_of(model_int8 / INT8_FILE)
    assert {k: v for k, v in after["files"].items() if k != INT8_FILE} == before["files"]
    assert {k: v for k, v in after.items() if k not in ("files", "audio_encoder", "encoder_quant")} == \
        {k: v for k, v in before.items() if k not in ("files", "audio_encoder", "encoder_quant")}
    assert not [p.name for p in model_int8.iterdir() if p.name.startswith(".")]
    assert load_manifest(model_int8).encoder_quant == "int8"


@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_int8_encoder_greedy_tokens_against_the_official(model_int8, reference, name):
    out = ask_json(model_int8, OFFICIAL_TINY / REFERENCE_INPUTS[name], "--truncate")
    official = reference[f"{name}.greedy_ids"][0, 1:].tolist()
    n = OFFICIAL_PREFIX[name]
    assert out["tokens"][:n] == official[:n]


def test_quantized_layers(model_f32, tmp_path):
    """BEATs' linear layers and Whisper's but its first and last layer; never the Q-Former's or the projection's
    (its queries follow Whisper's and BEATs' frame counts, a shape and not a value)."""
    import onnx

    from export.encoder_quant import quantize_encoder, quantized_nodes, weight_matmul_parts

    model = onnx.load(str(model_f32 / FP32_FILE))
    parts = weight_matmul_parts(model)
    config = load_manifest(model_f32).config
    whisper = [n for n, p in parts.items() if p == "whisper"]
    beats = [n for n, p in parts.items() if p == "beats"]
    assert len(whisper) == 6 * config.whisper.n_layers
    # the patch embedding's projection, then per layer q, k, v, the relative position gate, out, fc1, fc2
    assert len(beats) == 1 + 7 * config.beats.encoder_layers
    assert "fusion" in parts.values()
    assert set(quantized_nodes(model)) == set(beats + whisper[6:-6])
    assert set(quantized_nodes(model, fp32_edge_layers=0)) == set(whisper + beats)
    quantize_encoder(model_f32 / FP32_FILE, tmp_path / INT8_FILE)
    ops = [n.op_type for n in onnx.load(str(tmp_path / INT8_FILE)).graph.node]
    assert ops.count("MatMulInteger") == len(quantized_nodes(model))


def test_int8_audio_embeddings_are_close_to_fp32(model_int8):
    manifest = load_manifest(model_int8)
    config = manifest.config
    fp32 = AudioEncoder(manifest.path(FP32_FILE), n_threads=1, device="cpu")
    int8 = AudioEncoder(manifest.path(INT8_FILE), n_threads=1, device="cpu")
    for wav in REFERENCE_INPUTS.values():
        wave, _ = audio.fit_to_chunk(audio.load_audio(OFFICIAL_TINY / wav, config.sample_rate),
                                     config.sample_rate, config.min_seconds, config.max_seconds)
        mel, fbank = encoder_inputs(wave, config)
        a, b = fp32(mel, fbank).ravel(), int8(mel, fbank).ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= MIN_COSINE, wav


def test_requantize_back_to_fp32_and_again_is_a_manifest_change(model_int8, tmp_path):
    model = shutil.copytree(model_int8, tmp_path / "m")
    int8_sha = sha256_of(model / INT8_FILE)
    r = salmonn("export", "--requantize-encoder", model, "--encoder-quant", "fp32")
    assert r.returncode == 0, r.stderr
    assert load_manifest(model).audio_encoder == FP32_FILE
    r = salmonn("export", "--requantize-encoder", model, "--encoder-quant", "int8")
    assert r.returncode == 0, r.stderr
    assert load_manifest(model).audio_encoder == INT8_FILE and sha256_of(model / INT8_FILE) == int8_sha
    r = salmonn("export", "--requantize-encoder", model, "--encoder-quant", "int8")
    assert r.returncode == 0 and "already int8" in r.stderr


def test_tampered_int8_encoder_is_rejected(model_int8, tmp_path):
    broken = shutil.copytree(model_int8, tmp_path / "m")
    onnx_file = broken / INT8_FILE
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", "Hi", "--model", broken,
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    assert "sha256" in line and INT8_FILE in line
    # requantizing checks the files first too, and leaves the directory as it was
    manifest = (broken / "salmonn.json").read_text()
    line = one_line_error(salmonn("export", "--requantize-encoder", broken, "--encoder-quant", "fp32",
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    assert "sha256" in line
    assert (broken / "salmonn.json").read_text() == manifest


def test_requantize_errors(model_q8, model_q8_int8, tmp_path):
    line = one_line_error(salmonn("export", "--requantize-encoder", model_q8_int8, "--encoder-quant", "fp32"))
    assert "no fp32 audio encoder" in line
    line = one_line_error(salmonn("export", "--requantize-encoder", model_q8, "--encoder-quant", "int4"))
    assert "unknown encoder quantization 'int4'" in line
    line = one_line_error(salmonn("export", "--requantize-encoder", model_q8))
    assert "needs --encoder-quant" in line
    line = one_line_error(salmonn("export", "--requantize-encoder", tmp_path / "none", "--encoder-quant", "int8"))
    assert "not found" in line
    line = one_line_error(salmonn("export", "--requantize-encoder", model_q8, "--encoder-quant", "int8",
                                  "--out", tmp_path / "x"))
    assert "in place" in line


def test_unknown_encoder_quant_in_the_manifest_is_malformed(model_int8, tmp_path):
    model = shutil.copytree(model_int8, tmp_path / "m")
    d = json.loads((model / "salmonn.json").read_text())
    (model / "salmonn.json").write_text(json.dumps({**d, "encoder_quant": "int3"}))
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", "Hi", "--model", model))
    assert "malformed" in line and "encoder_quant" in line


def test_hard_linked_external_weights_are_one_clear_error(tmp_path):
    """A real-shape encoder keeps its weights in `audio_encoder.onnx.data`; onnx refuses to read that file
    when it has other hard links (`cp -al` of a model directory): one line naming it, nothing written."""
    model = tmp_path / "model"
    model.mkdir()
    (model / FP32_FILE).write_bytes(b"graph")
    (tmp_path / "original.data").write_bytes(b"weights")
    os.link(tmp_path / "original.data", model / (FP32_FILE + ".data"))
    with pytest.raises(SalmonnError, match="has other hard links"):
        quantize_encoder(model / FP32_FILE, model / INT8_FILE)
    assert sorted(p.name for p in model.iterdir()) == [FP32_FILE, FP32_FILE + ".data"]
