"""Nothing is tuned to the shipped fixture's shapes: a second official-format model with other
shapes everywhere, built here, goes through the real `salmonn export` / `salmonn ask` commands and
must answer exactly like our PyTorch model loaded from the same files.

Shapes (tests/official_format.py, `OtherShapes`): Whisper d_model 48, 3 layers, 6 heads, 80 or
128 mel bins; BEATs 40/64 wide, 3 layers, 8 heads; Q-Former hidden 128 (2 heads by the hidden//64
rule), 3 layers, 2 queries per window; 0.5 s windows (25 frames, 60 windows, 120 audio tokens);
LLaMA hidden 96, 3 layers, 6 heads, 2 KV heads (GQA); LoRA r 4 alpha 16 on q, k and v.
The 80-mel model stores its LoRA under the old peft key names, the 128-mel one under the current.

Tolerances (fixture README): mel 2e-4, audio embeddings 1e-4, logits 5e-4 abs; tokens exact, with
the PyTorch top-1/top-2 logit gap asserted > 1e-3 at every step so a near-tie fails loudly.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from conftest import AUDIO, OFFICIAL_TINY, salmonn
from official_format import OfficialFiles, OtherShapes, build_official_model
from salmonn_cli import features
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.encoder import AudioEncoder
from salmonn_cli.llm import LlamaModel
from train.official import load_official
from torch_reference import greedy

PROMPT = "Describe the audio."
GREEDY_STEPS = 8
CLIPS = {"excitement": AUDIO / "excitement.wav", "long": OFFICIAL_TINY / "long_40s.wav"}
MEL_BINS = (80, 128)
SEEDS = {80: 0, 128: 1}
MEL_ATOL = 2e-4
EMBED_ATOL = 1e-4
LOGIT_ATOL = 5e-4
MIN_GREEDY_GAP = 1e-3
# q8_0 moves logits by ~0.02 (parity notes); its first token is only compared where the gap is wider
MIN_Q8_FIRST_GAP = 0.05
N_CTX = 512


def other_shapes(n_mels: int) -> OtherShapes:
    shapes = OtherShapes()
    shapes.whisper = dataclasses.replace(shapes.whisper, n_mels=n_mels)
    return shapes


def ask_json(model_dir, wav) -> dict:
    # --truncate: the PyTorch reference hears the first 30 s, as the official model does
    r = salmonn("ask", wav, PROMPT, "--model", model_dir, "--json", "--temperature", "0",
                "--max-tokens", GREEDY_STEPS, "--threads", "1", "--truncate")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def official_wave(path) -> np.ndarray:
    """The official preprocessing: float64, channel 0, zero-padded to 1 s, cut to 30 s (16 kHz files)."""
    wave, rate = sf.read(path, dtype="float64", always_2d=True)
    assert rate == 16000
    wave = wave[:, 0]
    return np.pad(wave, (0, max(0, rate - len(wave))))[:30 * rate]


@dataclasses.dataclass
class ClipReference:
    tokens: list[int]              # PyTorch greedy tokens
    gaps: list[float]              # top-1 minus top-2 logit at each greedy step
    mel_diff: float                # runtime numpy log-mel vs transformers' WhisperFeatureExtractor
    onnx_embeds_diff: float        # ONNX audio encoder vs PyTorch, same mel and fbank
    gguf_logits_diff: float        # llama.cpp f32 (exact attention) vs PyTorch, last prompt position


@dataclasses.dataclass
class Variant:
    n_mels: int
    files: OfficialFiles
    model_f32: Path               # `salmonn export --official-ckpt ... --quant f32` output
    config: SalmonnConfig          # as our PyTorch loader read it from the files
    prompt_ids: tuple[list[int], list[int]]
    gguf_prompt_ids: tuple[list[int], list[int]]
    clips: dict[str, ClipReference]


def export_f32(files: OfficialFiles, out):
    r = salmonn("export", "--official-ckpt", files.ckpt, "--whisper", files.whisper, "--beats", files.beats,
                "--llm", files.llm, "--quant", "f32", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def reference_for_clip(model, config, path, prompt_ids, encoder: AudioEncoder, llm: LlamaModel) -> ClipReference:
    wave = official_wave(path)
    extractor = WhisperFeatureExtractor(feature_size=config.whisper.n_mels)
    mel = extractor(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    fbank = features.beats_fbank(wave)[None]
    runtime_mel = features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels)
    with torch.no_grad():
        audio_embeds = model.encode_audio(torch.from_numpy(mel), torch.from_numpy(fbank))
        embeds = model.llm_input_embeds(audio_embeds, *prompt_ids)
        last_logits = model.llama_model(inputs_embeds=embeds).logits[0, -1].numpy()
    tokens, gaps, _ = greedy(model, embeds, GREEDY_STEPS)
    onnx_embeds = encoder(mel[0], fbank[0])
    llm.reset()
    llm_logits = llm.decode_embeddings(embeds[0].numpy())
    return ClipReference(
        tokens=tokens, gaps=gaps,
        mel_diff=float(np.abs(runtime_mel - mel[0]).max()),
        onnx_embeds_diff=float(np.abs(onnx_embeds - audio_embeds[0].numpy()).max()),
        gguf_logits_diff=float(np.abs(llm_logits - last_logits).max()),
    )


def build_variant(n_mels: int, root) -> Variant:
    files = build_official_model(root / "official", other_shapes(n_mels), OFFICIAL_TINY / "vicuna",
                                 seed=SEEDS[n_mels], old_lora_keys=n_mels == 80)
    model_dir = export_f32(files, root / "model-f32")
    torch.set_num_threads(2)
    model, config = load_official(files.ckpt, files.whisper, files.beats, files.llm)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(files.llm / "tokenizer.model"))
    pieces = config.prompt_pieces(PROMPT)
    prompt_ids = (spm.encode(pieces[0]), spm.encode(pieces[1]))
    encoder = AudioEncoder(model_dir / "audio_encoder.onnx", n_threads=1, device="cpu")
    with LlamaModel(model_dir / "llm-f32.gguf", n_ctx=N_CTX, n_threads=1, exact=True) as llm:
        gguf_prompt_ids = (llm.tokenize(pieces[0]), llm.tokenize(pieces[1]))
        clips = {name: reference_for_clip(model, config, path, prompt_ids, encoder, llm)
                 for name, path in CLIPS.items()}
    return Variant(n_mels, files, model_dir, config, prompt_ids, gguf_prompt_ids, clips)


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """n_mels -> Variant, each built, exported and referenced once per session."""
    built: dict[int, Variant] = {}

    def get(n_mels: int) -> Variant:
        if n_mels not in built:
            built[n_mels] = build_variant(n_mels, tmp_path_factory.mktemp(f"other-shapes-{n_mels}mel"))
        return built[n_mels]

    return get


# --- the built files are what the brief says ------------------------------------------------------

@pytest.mark.parametrize("n_mels", MEL_BINS)
def test_checkpoint_has_the_official_layout_and_quirks(variants, n_mels):
    variant = variants(n_mels)
    ckpt = torch.load(variant.files.ckpt, map_location="cpu", weights_only=True)
    keys = set(ckpt["model"])
    lora = sorted(k for k in keys if ".lora_" in k)
    assert len(lora) == 3 * 3 * 2                       # 3 layers x q/k/v x A/B
    assert all(k.startswith("llama_model.base_model.model.model.layers.") for k in lora)
    assert all((".default." not in k) == (n_mels == 80) for k in lora)
    assert "speech_Qformer.bert.embeddings.position_ids" in keys
    assert sum(k.endswith("rotary_emb.inv_freq") for k in keys) == 3
    assert {f"beats.encoder.layers.{n}.self_attn.relative_attention_bias.weight" for n in (1, 2)} <= keys
    assert ckpt["config"]["model"]["whisper_path"] == "whisper"
    assert ckpt["model"]["speech_query_tokens"].shape == (1, 2, 128)


# --- 1. export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_mels", MEL_BINS)
def test_export_manifest_has_the_new_shapes(variants, n_mels):
    variant = variants(n_mels)
    manifest = json.loads((variant.model_f32 / "salmonn.json").read_text())
    config = manifest["config"]
    assert manifest["quant"] == "f32"
    assert config["whisper"] == {"n_mels": n_mels, "d_model": 48, "n_layers": 3, "n_heads": 6,
                                 "ffn_dim": 96, "max_source_positions": 1500}
    assert {k: config["beats"][k] for k in ("embed_dim", "encoder_layers", "encoder_embed_dim",
                                            "encoder_ffn_embed_dim", "encoder_attention_heads")} == \
        {"embed_dim": 40, "encoder_layers": 3, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 80,
         "encoder_attention_heads": 8}
    assert {k: config["qformer"][k] for k in ("hidden", "n_layers", "n_heads", "intermediate", "num_query_tokens")} \
        == {"hidden": 128, "n_layers": 3, "n_heads": 2, "intermediate": 256, "num_query_tokens": 2}
    assert {k: config["llm"][k] for k in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")} \
        == {"hidden_size": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 160}
    assert config["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj"]}
    cfg = variant.config
    assert (cfg.window_frames, cfg.stride_frames, cfg.n_windows) == (25, 25, 60)
    assert (cfg.n_audio_tokens, cfg.fused_width) == (2 * 60, 48 + 64)


# --- the pieces the runtime uses, against PyTorch -------------------------------------------------

@pytest.mark.parametrize("n_mels", MEL_BINS)
def test_runtime_pieces_match_pytorch(variants, n_mels):
    variant = variants(n_mels)
    assert variant.gguf_prompt_ids == variant.prompt_ids          # exact
    for name, clip in variant.clips.items():
        print(f"{n_mels} mels, {name}: mel {clip.mel_diff:.2e}, ONNX embeds {clip.onnx_embeds_diff:.2e}, "
              f"GGUF logits {clip.gguf_logits_diff:.2e}, smallest gap {min(clip.gaps):.4f}")
        assert clip.mel_diff <= MEL_ATOL
        assert clip.onnx_embeds_diff <= EMBED_ATOL
        assert clip.gguf_logits_diff <= LOGIT_ATOL


# --- 2. ask = PyTorch greedy ----------------------------------------------------------------------

@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("n_mels", MEL_BINS)
def test_ask_returns_the_pytorch_greedy_tokens(variants, n_mels, clip):
    variant = variants(n_mels)
    reference = variant.clips[clip]
    assert min(reference.gaps) > MIN_GREEDY_GAP, "near-tie in the random model: comparison would be flaky"
    out = ask_json(variant.model_f32, CLIPS[clip])
    assert out["tokens"] == reference.tokens                     # exact
    assert out["truncated"] == (clip == "long")
    assert out["prompt_tokens"] == 1 + len(variant.prompt_ids[0]) + 120 + len(variant.prompt_ids[1])


def test_the_two_clips_give_different_answers(variants):
    """The audio reaches the answer (a model deaf to its input would pass the tests above)."""
    for n_mels in MEL_BINS:
        clips = variants(n_mels).clips
        assert clips["excitement"].tokens != clips["long"].tokens


# --- 3. export --checkpoint (paths from the checkpoint's config), q8_0 ----------------------------

def test_export_from_checkpoint_config_q8_0_same_first_token(variants, tmp_path):
    variant = variants(128)
    out = tmp_path / "model-q8_0"
    r = salmonn("export", "--checkpoint", variant.files.ckpt, "--out", out, "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "salmonn.json").read_text())
    assert manifest["quant"] == "q8_0" and manifest["config"] == \
        json.loads((variant.model_f32 / "salmonn.json").read_text())["config"]
    for name, path in CLIPS.items():
        reference = variant.clips[name]
        assert reference.gaps[0] > MIN_Q8_FIRST_GAP
        assert ask_json(out, path)["tokens"][0] == reference.tokens[0]
