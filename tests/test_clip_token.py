"""The clip token (`SalmonnConfig.clip_token_hidden`): one LLM token per clip, after its window tokens,
pooled from all the fused frames (train/model.py `ClipTokenHead`). Training, the ONNX export and
`salmonn ask` must all produce it, in the same place, counted by the same formula (salmonn_cli/trim.py).

Tolerances as in tests/test_trim.py: training path vs inference path 1e-5 abs (same float32 ops),
ONNX vs PyTorch embeddings 1e-4 abs, tokens exact with the PyTorch top-1/top-2 gap > 1e-3 at each step.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import AUDIO, OFFICIAL_TINY, salmonn
from official_format import OtherShapes, export_variant
from salmonn_cli import audio, features
from train.presets import tiny
from salmonn_cli.encoder import AudioEncoder as OnnxAudioEncoder
from salmonn_cli.manifest import check_config
from salmonn_cli.trim import audio_token_count, clip_fbank_frames, mel_frame_count, window_token_count
from train.loss import encode_batch, window_token_counts
from train.model import ClipTokenHead, Salmonn, clip_token_input_width
from torch_reference import greedy

TRAIN_PATH_ATOL = 1e-5
EMBED_ATOL = 1e-4
MIN_GREEDY_GAP = 1e-3
GREEDY_STEPS = 8
CLIP_HIDDEN = 24
AUDIO_TOKEN_RMS = 0.5
PROMPT = "What sound is in the background?"
RATE = 16000


def random_batch(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two clips' features of different lengths (3 s and 2 s of fbank frames), random values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 80, 3000, generator=g), [torch.randn(298, 128, generator=g), torch.randn(198, 128, generator=g)]


@pytest.mark.parametrize("trim", [True, False])
def test_clip_token_ends_each_clip_and_leaves_the_window_tokens_alone(trim):
    torch.manual_seed(0)
    plain_config = dataclasses.replace(tiny(), trim_windows=trim, audio_token_rms=AUDIO_TOKEN_RMS)
    config = dataclasses.replace(plain_config, clip_token_hidden=CLIP_HIDDEN)
    model = Salmonn(config).eval()
    plain = Salmonn(plain_config).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("clip_token_head.")})
    mel, fbanks = random_batch(1)
    with torch.no_grad():
        batched = encode_batch(model, mel, fbanks)
        for i, fbank in enumerate(fbanks):
            alone = model.encode_audio(mel[i:i + 1], fbank[None])[0]
            windows = plain.encode_audio(mel[i:i + 1], fbank[None])[0]
            n = audio_token_count(config, fbank.shape[0])
            assert alone.shape[0] == n == window_token_count(config, fbank.shape[0]) + 1 == windows.shape[0] + 1
            assert float((batched[i, :n] - alone).abs().max()) <= TRAIN_PATH_ATOL
            assert torch.equal(alone[:-1], windows)                  # the window tokens are unchanged
            rms = float(alone[-1].pow(2).mean().sqrt())
            assert abs(rms - AUDIO_TOKEN_RMS) < 1e-4     # scaled like the other audio tokens (up to the eps)
    counts = [audio_token_count(config, f.shape[0]) for f in fbanks]
    assert counts[0] > counts[1] if trim else counts[0] == counts[1] == config.n_audio_tokens
    assert config.n_audio_tokens == plain_config.n_audio_tokens + 1


def test_clip_token_pools_over_the_frames_of_its_own_clip():
    torch.manual_seed(0)
    head = ClipTokenHead(6, 8, 4)
    frames = torch.randn(1, 5, 6)
    assert torch.allclose(head(frames), head(frames.flip(1)), atol=1e-6)          # order-free pooling
    assert not torch.allclose(head(frames), head(frames[:, :3]))                # but over every frame


def test_window_token_counts_exclude_the_clip_token():
    from train.data import Batch

    config = dataclasses.replace(tiny(), trim_windows=True, clip_token_hidden=CLIP_HIDDEN)
    model = Salmonn(config).eval()
    mel, fbanks = random_batch(2)
    batch = Batch([0, 1], mel, fbanks, [[1], [1]], [[2], [2]], [[3, 2], [3, 2]])
    assert window_token_counts(model, None, batch) == [window_token_count(config, f.shape[0]) for f in fbanks]


def test_negative_clip_token_width_is_refused():
    with pytest.raises(ValueError, match="clip_token_hidden"):
        check_config(dataclasses.replace(tiny(), clip_token_hidden=-1))


def test_clip_tag_head_scores_against_the_class_names_embeddings():
    from train.align import ClipTagHead

    names = {"bell": torch.tensor([1.0, 0.0, 0.0]), "siren": torch.tensor([0.0, 2.0, 0.0])}
    head = ClipTagHead(["", "bell", "siren"], names)
    with torch.no_grad():
        head.none.copy_(torch.tensor([0.0, 0.0, 3.0]))
    logits = head(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[0.0, 2.0, 2.0], [3.0, 0.0, 0.0]]))
    assert set(head.state_dict()) == {"names", "none", "log_scale"}


# --- export and runtime --------------------------------------------------------------------------

def clip_head_state(config, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    head = ClipTokenHead(clip_token_input_width(config), CLIP_HIDDEN, config.llm.hidden_size)
    return {f"clip_token_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An official-format model (trimmed windows, rescaled tokens, as salmonn-nano) whose checkpoint
    also holds a clip token head, exported by `salmonn export`."""
    settings = dict(trim_windows=True, audio_token_rms=AUDIO_TOKEN_RMS, clip_token_hidden=CLIP_HIDDEN)
    return export_variant(tmp_path_factory.mktemp("clip_token"), settings, PROMPT, OFFICIAL_TINY / "vicuna",
                          clip_head_state(OtherShapes().config(), seed=4))


def runtime_features(wave: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    wave, _ = audio.fit_to_chunk(wave, config.sample_rate, config.min_seconds, config.max_seconds)
    return features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels), features.beats_fbank(wave)


def test_manifest_carries_the_clip_token(exported):
    assert exported.config.clip_token_hidden == CLIP_HIDDEN
    manifest = json.loads((exported.model_dir / "salmonn.json").read_text())
    assert manifest["config"]["clip_token_hidden"] == CLIP_HIDDEN


@pytest.mark.parametrize("seconds", [1.0, 3.2, 30.0])
def test_onnx_clip_token_matches_pytorch(exported, seconds):
    config = exported.config
    rng = np.random.default_rng(int(seconds * 10))
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (300 + 500 * t) * t) + rng.normal(0, 0.05, t.size)
    mel, fbank = runtime_features(wave, config)
    with torch.no_grad():
        expected = exported.model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])[0].numpy()
    encoder = OnnxAudioEncoder(exported.model_dir / "audio_encoder.onnx", n_threads=1, device="cpu")
    got = encoder(mel[:, :mel_frame_count(config, fbank.shape[0])], fbank)
    assert got.shape == (audio_token_count(config, clip_fbank_frames(config, wave.size)), config.llm.hidden_size)
    diff = float(np.abs(got - expected).max())
    print(f"{seconds} s: {got.shape[0]} tokens (clip token last), ONNX vs PyTorch {diff:.2e}")
    assert diff <= EMBED_ATOL


def test_ask_reads_the_clip_token(exported):
    model, config = exported.model, exported.config
    clip = AUDIO / "excitement.wav"
    wave = audio.load_audio(clip, config.sample_rate)
    mel, fbank = runtime_features(wave, config)
    with torch.no_grad():
        audio_embeds = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])
        tokens, gaps, _ = greedy(model, model.llm_input_embeds(audio_embeds, *exported.prompt_ids), GREEDY_STEPS)
    assert min(gaps) > MIN_GREEDY_GAP, "near-tie in the random model: comparison would be flaky"
    r = salmonn("ask", clip, PROMPT, "--model", exported.model_dir, "--json", "--temperature", "0",
                "--max-tokens", GREEDY_STEPS, "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == tokens
    n_audio = window_token_count(config, fbank.shape[0]) + 1
    assert out["prompt_tokens"] == 1 + len(exported.prompt_ids[0]) + n_audio + len(exported.prompt_ids[1])


def test_checkpoint_without_its_clip_token_head_is_refused(exported, tmp_path):
    files = exported.files
    ckpt = torch.load(files.ckpt, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("clip_token_head.")}
    broken = tmp_path / "no_head.pth"
    torch.save(ckpt, broken)
    r = salmonn("export", "--official-ckpt", broken, "--whisper", files.whisper, "--beats", files.beats,
                "--llm", files.llm, "--quant", "f32", "--out", tmp_path / "out")
    assert r.returncode != 0 and "clip_token_head" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
