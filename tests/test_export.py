"""The exported pipeline stage by stage against our PyTorch model, on fresh audio the fixture never saw:
ONNX audio embeddings vs PyTorch, and llama.cpp (GGUF) logits vs PyTorch with the same prefix embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import OFFICIAL_TINY
from salmonn_cli import audio, features
from salmonn_cli.encoder import AudioEncoder as OnnxAudioEncoder
from salmonn_cli.llm import LlamaModel
from salmonn_cli.manifest import load_manifest
from salmonn_cli.prompt import build_prompt
from train.official import load_official

EMBEDS_ATOL = 1e-4          # ONNX Runtime vs PyTorch, float32 (measured 2.3e-6)
LOGITS_F32_ATOL = 5e-4      # llama.cpp f32 with exact attention vs PyTorch (measured 3.3e-6)
LOGITS_Q8_ATOL = 0.5        # q8_0 quantizes the large random embeddings of this fixture (measured 0.15)
LENGTHS_S = (0.3, 1.0, 4.7, 17.0, 30.0)


@pytest.fixture(scope="module")
def torch_model():
    torch.set_num_threads(2)
    model, config = load_official(OFFICIAL_TINY / "salmonn_tiny.pth", OFFICIAL_TINY / "whisper",
                                  OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna")
    return model, config


@pytest.fixture(scope="module")
def exported(model_f32, model_q8):
    return {"f32": load_manifest(model_f32), "q8_0": load_manifest(model_q8)}


def random_clip(seconds: float, seed: int) -> np.ndarray:
    """Noise bursts over a chirp: broadband, non-stationary, different every length."""
    rng = np.random.default_rng(seed)
    n = int(seconds * audio.SAMPLE_RATE)
    t = np.arange(n) / audio.SAMPLE_RATE
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 900 * t / max(seconds, 1e-3)) * t)
    bursts = rng.normal(0, 0.2, n) * (rng.random(n // 800 + 1).repeat(800)[:n] > 0.6)
    return np.clip(chirp + bursts, -1, 1)


def features_of(wave: np.ndarray, config):
    wave, _ = audio.fit_to_chunk(wave, config.sample_rate, config.min_seconds, config.max_seconds)
    mel = features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels)
    return mel, features.beats_fbank(wave)


@pytest.mark.parametrize("seconds", LENGTHS_S)
def test_onnx_audio_embeddings_match_pytorch(torch_model, exported, seconds):
    model, config = torch_model
    mel, fbank = features_of(random_clip(seconds, seed=int(seconds * 10)), config)
    with torch.no_grad():
        expected = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])[0].numpy()
    manifest = exported["f32"]
    got = OnnxAudioEncoder(manifest.path(manifest.audio_encoder), n_threads=1, device="cpu")(mel, fbank)
    assert got.shape == (config.n_audio_tokens, config.llm.hidden_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=EMBEDS_ATOL)


@pytest.mark.parametrize("quant,atol", [("f32", LOGITS_F32_ATOL), ("q8_0", LOGITS_Q8_ATOL)])
def test_gguf_logits_match_pytorch_with_prefix_embeddings(torch_model, exported, quant, atol):
    model, config = torch_model
    manifest = exported[quant]
    mel, fbank = features_of(random_clip(3.3, seed=5), config)
    with LlamaModel(manifest.path(manifest.llm), n_ctx=256, n_threads=1,
                    exact=manifest.exact_attention) as llm:
        prompt = build_prompt(config, "What can you hear?", llm.tokenize)
        with torch.no_grad():
            audio_embeds = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])
            embeds = model.llm_input_embeds(audio_embeds, prompt.ids_before, prompt.ids_after)
            expected = model.llama_model(inputs_embeds=embeds).logits[0, -1, :32000].numpy()
        # the same prefix embeddings, fed to llama.cpp as one embedding batch
        got = llm.decode_embeddings(embeds[0].numpy())[:32000]
    diff = np.abs(got - expected).max()
    assert diff <= atol, diff
    assert int(np.argmax(got)) == int(np.argmax(expected))
