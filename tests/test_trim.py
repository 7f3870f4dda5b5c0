"""Windows trimmed to the clip (`SalmonnConfig.trim_windows`, salmonn_cli/trim.py): one formula,
honoured alike by the PyTorch model, training batches, the ONNX export and `salmonn ask`.

The end-to-end model is an official-format model with other shapes than the fixture
(tests/official_format.py `OtherShapes`: 0.5 s windows of 25 frames, 2 queries per window) whose
checkpoint config says `trim_windows: true`.

Tolerances (fixture README): audio embeddings 1e-4 abs (ONNX vs PyTorch); training path vs
inference path 1e-5 abs (same float32 ops, measured ~1e-6); losses 1e-5 abs per sample; Whisper
on the full mel through our cut-table forward vs HF: bit-identical; tokens exact, with the PyTorch
top-1/top-2 logit gap asserted > 1e-3 at every greedy step.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import AUDIO, OFFICIAL_TINY, salmonn
from official_format import OtherShapes, export_variant
from salmonn_cli import audio, features
from train.presets import official_13b, tiny
from salmonn_cli.encoder import AudioEncoder as OnnxAudioEncoder
from salmonn_cli.trim import (audio_token_count, clip_fbank_frames, encoder_frame_count,
                              mel_frame_count, window_count)
from train.data import IGNORE_INDEX, Batch, Sample, clip_features, load_wave
from train.loss import TrainingModel, assemble_inputs, encode_batch
from train.model import Salmonn, whisper_states
from torch_reference import greedy

EMBED_ATOL = 1e-4
TRAIN_PATH_ATOL = 1e-5
LOSS_ATOL = 1e-5
MIN_GREEDY_GAP = 1e-3
GREEDY_STEPS = 8
PROMPT = "Describe the audio."
RATE = 16000
ONNX_LENGTHS_S = (0.3, 1.0, 3.2, 17.0, 29.9, 30.0)
AUDIO_TOKEN_RMS = 0.5        # any fixed value: the exported graph must rescale exactly as PyTorch does
# official geometry (17-frame windows, 50 frames/s): seconds -> windows kept
OFFICIAL_WINDOWS = {0.3: 3, 1.0: 3, 3.0: 9, 3.2: 10, 29.9: 88, 30.0: 88}
ASK_CLIPS = {"excitement": AUDIO / "excitement.wav", "speech": OFFICIAL_TINY / "speech_2p5s.wav"}


def trimmed(config):
    return dataclasses.replace(config, trim_windows=True)


def samples(seconds: float) -> int:
    return int(round(seconds * RATE))


def random_clip(seconds: float, seed: int) -> np.ndarray:
    """A chirp under noise bursts: broadband and different at every length."""
    rng = np.random.default_rng(seed)
    n = samples(seconds)
    t = np.arange(n) / RATE
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 900 * t / seconds) * t)
    bursts = rng.normal(0, 0.2, n) * (rng.random(n // 800 + 1).repeat(800)[:n] > 0.6)
    return np.clip(chirp + bursts, -1, 1)


def runtime_features(wave: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    """What `Pipeline.embed_wave` computes: the full official log-mel and the clip's fbank."""
    wave, _ = audio.fit_to_chunk(wave, config.sample_rate, config.min_seconds, config.max_seconds)
    return features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels), features.beats_fbank(wave)


# --- the formula ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds,expected", sorted(OFFICIAL_WINDOWS.items()))
def test_window_count_at_official_geometry(seconds, expected):
    config = trimmed(official_13b())
    fbank_frames = clip_fbank_frames(config, samples(seconds))
    assert window_count(config, fbank_frames) == expected
    assert audio_token_count(config, fbank_frames) == expected
    assert encoder_frame_count(config, fbank_frames) == 17 * expected
    assert mel_frame_count(config, fbank_frames) == 2 * 17 * expected


def test_official_setting_keeps_every_window_at_every_length():
    config = official_13b()
    for seconds in (0.3, 1.0, 3.2, 29.9, 30.0, 45.0):
        fbank_frames = clip_fbank_frames(config, samples(seconds))
        assert window_count(config, fbank_frames) == config.n_windows == 88
        assert mel_frame_count(config, fbank_frames) == 3000


@pytest.mark.parametrize("make_config", [official_13b, lambda: OtherShapes().config()])
def test_kept_windows_cover_the_audio_and_no_more(make_config):
    """At every 10 ms step: the kept windows reach the last fused frame the fbank covers, and
    one window fewer would not."""
    config = trimmed(make_config())
    samples_per_frame = config.max_seconds * config.sample_rate / config.encoder_frames
    for n in range(samples(1.0), samples(30.0) + 1, 160):
        fbank_frames = clip_fbank_frames(config, n)
        covered = (fbank_frames - 1) * 160 + 400
        frames_with_audio = int(np.ceil(covered / samples_per_frame))
        n_windows = window_count(config, fbank_frames)
        reach = encoder_frame_count(config, fbank_frames)
        assert reach >= min(frames_with_audio, config.n_windows * config.stride_frames)
        if n_windows > 1:
            assert reach - config.stride_frames < frames_with_audio
        assert mel_frame_count(config, fbank_frames) <= config.whisper.n_mel_frames


# --- PyTorch -------------------------------------------------------------------------------------

def test_cut_table_whisper_forward_is_hf_on_the_full_mel():
    torch.manual_seed(0)
    model = Salmonn(tiny())
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        hf = model.speech_encoder(mel).last_hidden_state
        ours = whisper_states(model.speech_encoder, mel)
    assert torch.equal(hf, ours)


@pytest.fixture(scope="module")
def tiny_trimmed():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = trimmed(tiny())
    return Salmonn(config).eval(), config


def test_encode_audio_gives_the_trimmed_token_count_from_a_full_or_cut_mel(tiny_trimmed):
    model, config = tiny_trimmed
    mel, fbank = runtime_features(random_clip(3.2, seed=1), config)
    mel_t, fbank_t = torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None]
    with torch.no_grad():
        from_full = model.encode_audio(mel_t, fbank_t)
        from_cut = model.encode_audio(mel_t[..., :mel_frame_count(config, fbank.shape[0])], fbank_t)
    assert from_full.shape == (1, 10, config.llm.hidden_size)
    assert torch.equal(from_full, from_cut)


# --- training ------------------------------------------------------------------------------------

def two_clip_batch(config) -> Batch:
    """Two clips of different lengths (1.26 s: 4 windows, 2.5 s: 8) with different prompt and answer lengths."""
    feats = [clip_features(load_wave(Sample(str(path), ""), config), config) for path in ASK_CLIPS.values()]
    return Batch(indices=[0, 1], mel=torch.stack([torch.from_numpy(m) for m, _ in feats]),
                 fbanks=[torch.from_numpy(f) for _, f in feats],
                 ids_before=[[10, 11], [10, 11, 12]], ids_after=[[20, 21, 22], [20]],
                 answer_ids=[[30, 31, 2], [40, 41, 42, 43, 2]])


def one_sample(batch: Batch, i: int) -> Batch:
    return Batch([batch.indices[i]], batch.mel[i:i + 1], [batch.fbanks[i]], [batch.ids_before[i]],
                 [batch.ids_after[i]], [batch.answer_ids[i]])


def per_row_losses(model, inputs, mask, labels) -> list[float]:
    """Mean cross-entropy of each row's targets, from one forward over the whole batch."""
    llm = model.llm
    logits = llm(inputs_embeds=inputs, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return (losses.sum(dim=1) / counts).tolist()


def test_training_batch_of_two_lengths_gives_each_clip_its_own_windows(tiny_trimmed):
    model, config = tiny_trimmed
    batch = two_clip_batch(config)
    counts = [audio_token_count(config, f.shape[0]) for f in batch.fbanks]
    assert counts == [4, 8]
    with torch.no_grad():
        embeds = encode_batch(model, batch.mel, batch.fbanks)
        assert embeds.shape == (2, 8, config.llm.hidden_size)
        assert not embeds[0, 4:].any()                       # padding, never read
        for i in range(2):
            alone = model.encode_audio(batch.mel[i:i + 1], batch.fbanks[i][None])[0]
            diff = float((embeds[i, :counts[i]] - alone).abs().max())
            assert diff <= TRAIN_PATH_ATOL, diff
        inputs, mask, labels = assemble_inputs(model, embeds, batch)
    # [BOS] + before + own audio + after + answer, contiguous, padding at the end
    lengths = [1 + len(b) + n + len(a) + len(t)
               for b, n, a, t in zip(batch.ids_before, counts, batch.ids_after, batch.answer_ids)]
    assert mask.sum(dim=1).tolist() == lengths
    for i in range(2):
        n_prompt = 1 + len(batch.ids_before[i]) + counts[i] + len(batch.ids_after[i])
        assert labels[i, :n_prompt].eq(IGNORE_INDEX).all()
        assert labels[i, n_prompt:lengths[i]].tolist() == batch.answer_ids[i]
        assert torch.equal(inputs[i, 1 + len(batch.ids_before[i]):][:counts[i]], embeds[i, :counts[i]])


def test_cached_encoder_outputs_give_the_same_trimmed_tokens(tiny_trimmed):
    """The frozen-encoder cache (train/encoder_cache.py) stores each clip's trimmed Whisper state
    and BEATs output once; the tokens from it equal those computed from the features."""
    from train.encoder_cache import FrozenEncoderCache

    model, config = tiny_trimmed
    batch = two_clip_batch(config)
    keys = [("a.wav",), ("b.wav",)]
    cache = FrozenEncoderCache()
    with torch.no_grad():
        plain = encode_batch(model, batch.mel, batch.fbanks)
        first = encode_batch(model, batch.mel, batch.fbanks, keys, cache)
        again = encode_batch(model, torch.zeros_like(batch.mel), batch.fbanks, keys, cache)   # mel unused
    assert (cache.misses, cache.hits) == (2, 2)
    assert [cache.entries[k][0].shape[0] for k in keys] == [encoder_frame_count(config, f.shape[0])
                                                            for f in batch.fbanks]
    assert torch.equal(plain, first) and torch.equal(first, again)


def test_training_loss_of_two_lengths_equals_each_clip_alone(tiny_trimmed):
    model, config = tiny_trimmed
    batch = two_clip_batch(config)
    net = TrainingModel(model)
    with torch.no_grad():
        ce_sum, n_targets, *_ = net(batch)
        inputs, mask, labels = assemble_inputs(model, encode_batch(model, batch.mel, batch.fbanks), batch)
        batched_rows = per_row_losses(model, inputs, mask, labels)
        alone_rows, alone_sum = [], 0.0
        for i in range(2):
            single = one_sample(batch, i)
            s_inputs, s_mask, s_labels = assemble_inputs(
                model, encode_batch(model, single.mel, single.fbanks), single)
            alone_rows += per_row_losses(model, s_inputs, s_mask, s_labels)
            alone_sum += float(net(single)[0])
    assert int(n_targets) == batch.n_targets == 8
    print(f"per-sample losses batched {batched_rows}, alone {alone_rows}")
    np.testing.assert_allclose(batched_rows, alone_rows, rtol=0, atol=LOSS_ATOL)
    assert abs(float(ce_sum) - alone_sum) <= int(n_targets) * LOSS_ATOL


# --- export and runtime --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An official-format model whose checkpoint asks for trimmed windows and audio tokens rescaled to a
    fixed RMS (the two non-official settings salmonn-nano trains with), exported by `salmonn export`."""
    return export_variant(tmp_path_factory.mktemp("trimmed"), dict(trim_windows=True, audio_token_rms=AUDIO_TOKEN_RMS),
                          PROMPT, OFFICIAL_TINY / "vicuna")


def test_export_manifest_carries_the_setting(exported):
    assert exported.config.trim_windows
    manifest = json.loads((exported.model_dir / "salmonn.json").read_text())
    assert manifest["config"]["trim_windows"] is True
    assert manifest["config"]["audio_token_rms"] == AUDIO_TOKEN_RMS


def test_audio_tokens_have_the_configured_rms(exported):
    mel, fbank = runtime_features(random_clip(2.0, seed=5), exported.config)
    with torch.no_grad():
        tokens = exported.model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])[0]
    rms = tokens.pow(2).mean(dim=-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, AUDIO_TOKEN_RMS), atol=1e-6)


@pytest.mark.parametrize("seconds", ONNX_LENGTHS_S)
def test_onnx_audio_embeddings_match_pytorch(exported, seconds):
    config = exported.config
    mel, fbank = runtime_features(random_clip(seconds, seed=int(seconds * 10)), config)
    with torch.no_grad():
        expected = exported.model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])[0].numpy()
    encoder = OnnxAudioEncoder(exported.model_dir / "audio_encoder.onnx", n_threads=1, device="cpu")
    got = encoder(mel[:, :mel_frame_count(config, fbank.shape[0])], fbank)
    assert got.shape == (audio_token_count(config, fbank.shape[0]), config.llm.hidden_size)
    assert got.shape[0] < config.n_audio_tokens or seconds >= 29.9
    diff = float(np.abs(got - expected).max())
    print(f"{seconds} s: {got.shape[0]} tokens, ONNX vs PyTorch {diff:.2e}")
    assert diff <= EMBED_ATOL


def ask_json(model_dir, wav, *extra) -> dict:
    r = salmonn("ask", wav, PROMPT, "--model", model_dir, "--json", "--temperature", "0",
                "--max-tokens", GREEDY_STEPS, "--threads", "1", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("clip", list(ASK_CLIPS))
def test_ask_returns_the_pytorch_greedy_tokens(exported, clip):
    model, config = exported.model, exported.config
    wave = audio.load_audio(ASK_CLIPS[clip], config.sample_rate)
    mel, fbank = runtime_features(wave, config)
    with torch.no_grad():
        audio_embeds = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])
        tokens, gaps, _ = greedy(model, model.llm_input_embeds(audio_embeds, *exported.prompt_ids), GREEDY_STEPS)
    assert min(gaps) > MIN_GREEDY_GAP, "near-tie in the random model: comparison would be flaky"
    n_audio = audio_token_count(config, fbank.shape[0])
    assert audio_embeds.shape[1] == n_audio < config.n_audio_tokens
    out = ask_json(exported.model_dir, ASK_CLIPS[clip])
    assert out["tokens"] == tokens                                  # exact
    assert out["prompt_tokens"] == 1 + len(exported.prompt_ids[0]) + n_audio + len(exported.prompt_ids[1])


def test_context_budget_counts_the_short_last_chunk_by_its_own_tokens(exported):
    """40 s = a full chunk (120 tokens) + a ~10 s one (about 40): a context with room for 165
    audio tokens holds both, where the untrimmed count (2 x 120) would have cut the file."""
    answer_room = 256 + GREEDY_STEPS              # pipeline.PROMPT_TEXT_BUDGET + one beam's answer
    context = 1 + answer_room + 165
    out = ask_json(exported.model_dir, OFFICIAL_TINY / "long_40s.wav", "--context", context)
    n_text = 1 + len(exported.prompt_ids[0]) + len(exported.prompt_ids[1])
    assert out["chunks"] == 2 and not out["truncated"]
    assert exported.config.n_audio_tokens < out["prompt_tokens"] - n_text <= 165
