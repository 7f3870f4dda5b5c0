"""The PyTorch SALMONN (train/) against the official-tiny fixture's reference outputs.

The reference's own `mel` and `beats_fbank` are fed in, so these tests do not depend on the front
end. Tolerances (max abs) are the fixture README's suggestions: encoder outputs, Q-Former in/out,
audio and input embeddings 1e-4; LLM hidden states and logits 5e-4; token ids exact.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from salmonn_cli import config as cfgmod
from salmonn_cli.errors import ModelError
from conftest import OFFICIAL_TINY, REFERENCE_INPUTS
from train import presets
from train.hf_files import read_llm_dims
from train.model import Salmonn, build_llama, is_trainable_name, window_index, window_starts
from train.official import load_checkpoint_into, load_official, save_official_format

EMBED_ATOL = 1e-4
LLM_ATOL = 5e-4
GREEDY_STEPS = 8
REFERENCE_VOCAB = 32000          # reference logits cover ids 0..31999 only
TRAINED_VALUES = 16_944_160      # fixture README: values in the 69 trained tensors
INPUTS = list(REFERENCE_INPUTS)


def official_paths(ckpt=None, llm_dir=None):
    return (ckpt or OFFICIAL_TINY / "salmonn_tiny.pth", OFFICIAL_TINY / "whisper",
            OFFICIAL_TINY / "beats.pt", llm_dir or OFFICIAL_TINY / "vicuna")


@pytest.fixture(scope="session")
def official():
    torch.set_num_threads(2)
    return load_official(*official_paths())


@pytest.fixture(scope="session")
def stages(official, reference):
    """Every intermediate of the audio path for each reference input, computed once."""
    model, _ = official
    encoder = model.audio_encoder()
    out = {}
    with torch.no_grad():
        for name in INPUTS:
            mel = torch.from_numpy(reference[f"{name}.mel"])
            fbank = torch.from_numpy(reference[f"{name}.beats_fbank"])
            fused = model.fuse(mel, fbank)
            audio_embeds = model.encode_audio(mel, fbank)
            out[name] = {
                "whisper_out": model.speech_encoder(mel).last_hidden_state,
                "qformer_in": fused,
                "qformer_out": encoder.qformer(fused),
                "audio_embeds": audio_embeds,
                "llm_input_embeds": model.llm_input_embeds(
                    audio_embeds, reference["prompt.ids_before"].tolist(), reference["prompt.ids_after"].tolist()),
            }
    return out


def max_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == expected.shape
    return float(np.abs(actual.detach().numpy() - expected).max())


def last_logits(model: Salmonn, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.llama_model(inputs_embeds=embeds).logits[:, -1, :REFERENCE_VOCAB]


# --- configuration read from the files ---------------------------------------------------------

def test_config_is_read_from_the_files(official):
    model, cfg = official
    assert cfg.whisper == cfgmod.WhisperDims(d_model=64, n_layers=2, n_heads=4, ffn_dim=128)
    assert (cfg.beats.encoder_embed_dim, cfg.beats.encoder_layers, cfg.beats.embed_dim) == (48, 2, 32)
    assert cfg.qformer == cfgmod.QFormerDims()          # bert-base, 2 layers, 1 query
    assert cfg.llm == cfgmod.LlmDims(hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128)
    assert cfg.lora == cfgmod.LoraDims(r=8, alpha=32.0, dropout=0.1, targets=("q_proj", "v_proj"))
    assert (cfg.window_frames, cfg.stride_frames, cfg.n_audio_tokens, cfg.fused_width) == (17, 17, 88, 112)
    trained = model.trainable_state_dict()
    assert len(trained) == 69 and sum(t.numel() for t in trained.values()) == TRAINED_VALUES
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    assert "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in trained
    assert "speech_Qformer.bert.embeddings.position_ids" in model.state_dict()
    assert not model.training


# --- audio path ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("stage", ["whisper_out", "qformer_in", "qformer_out", "audio_embeds", "llm_input_embeds"])
def test_audio_path_matches_reference(stages, reference, name, stage):
    diff = max_diff(stages[name][stage], reference[f"{name}.{stage}"])
    print(f"{name}.{stage} max abs diff {diff:.2e}")
    assert diff <= EMBED_ATOL


def test_audio_encoder_shares_modules_and_returns_tokens(official, stages, reference):
    model, cfg = official
    encoder = model.audio_encoder()
    assert encoder.speech_Qformer is model.speech_Qformer and encoder.beats is model.beats
    assert encoder.speech_query_tokens is model.speech_query_tokens
    with torch.no_grad():
        tokens = encoder(torch.from_numpy(reference["short.mel"]), torch.from_numpy(reference["short.beats_fbank"]))
    assert tuple(tokens.shape) == (cfg.n_audio_tokens, cfg.llm.hidden_size)
    assert torch.equal(tokens, stages["short"]["audio_embeds"][0])


def test_train_mode_drops_out_in_qformer_only(official, reference):
    model, _ = official
    mel = torch.from_numpy(reference["short.mel"])
    fbank = torch.from_numpy(reference["short.beats_fbank"])
    try:
        model.train()
        assert model.speech_Qformer.training and not model.speech_encoder.training and not model.beats.training
        with torch.no_grad():
            fused = model.fuse(mel, fbank)
            a, b = model.encode_audio(mel, fbank), model.encode_audio(mel, fbank)
    finally:
        model.eval()
    assert max_diff(fused, reference["short.qformer_in"]) <= EMBED_ATOL   # encoders unaffected
    assert not torch.equal(a, b)                                           # Q-Former dropout 0.1 active


@pytest.mark.parametrize("kernel,stride", [(17, 17), (5, 3), (4, 6)])
def test_windows_are_strided_slices(kernel, stride):
    x = torch.randn(2, 50, 3)
    windows = x[:, window_index(window_starts(x.shape[1], kernel, stride), kernel)]
    expected = x.unfold(1, kernel, stride).permute(0, 1, 3, 2)      # (B, L, k, C)
    assert torch.equal(windows, expected)


# --- LLM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", INPUTS)
def test_llm_hidden_states_and_logits(official, reference, name):
    model, _ = official
    embeds = torch.from_numpy(reference[f"{name}.llm_input_embeds"])
    with torch.no_grad():
        out = model.llama_model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = torch.cat(out.hidden_states, dim=0)
    hidden_diff = max_diff(hidden, reference[f"{name}.llm_hidden_states"])
    logits_diff = max_diff(out.logits[:, -1, :REFERENCE_VOCAB], reference[f"{name}.last_logits"])
    print(f"{name}: hidden states {hidden_diff:.2e}, last logits {logits_diff:.2e}")
    assert hidden_diff <= LLM_ATOL and logits_diff <= LLM_ATOL


@pytest.mark.parametrize("name", INPUTS)
def test_greedy_decode_matches_reference(official, reference, name):
    model, _ = official
    embeds = torch.from_numpy(reference[f"{name}.llm_input_embeds"])
    ids = []
    for _ in range(GREEDY_STEPS):
        next_id = int(last_logits(model, embeds)[0].argmax())
        ids.append(next_id)
        with torch.no_grad():
            embeds = torch.cat([embeds, model.embed_ids([next_id])], dim=1)
    assert ids == reference[f"{name}.greedy_ids"][0, 1:].tolist()


def test_lora_scale(official, reference):
    model, cfg = official
    embeds = torch.from_numpy(reference["speech.llm_input_embeds"])
    full = last_logits(model, embeds)
    assert model.lora_scale == cfg.lora.scale == 4.0
    try:
        model.lora_scale = 0.0
        off = last_logits(model, embeds)
        with model.llama_model.disable_adapter():
            base = last_logits(model, embeds)
        model.lora_scale = 2.0
        half = last_logits(model, embeds)
    finally:
        model.lora_scale = cfg.lora.scale
    assert torch.equal(off, base)
    # fixture README sensitivity table: LoRA off moves these logits by 5.66, scale 2 by 2.63
    assert float((full - off).abs().max()) > 1.0 and float((full - half).abs().max()) > 1.0
    assert torch.equal(last_logits(model, embeds), full)


def test_build_llama_adopts_weights_tied_and_gqa():
    dims = cfgmod.LlmDims(hidden_size=16, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=32,
                          vocab_size=50, tie_word_embeddings=True)
    torch.manual_seed(0)
    source = build_llama(dims)
    weights = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}  # as HF saves tied models
    llm = build_llama(dims, weights)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert tuple(llm.model.layers[0].self_attn.k_proj.weight.shape) == (8, 16)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, source(ids).logits)
    with pytest.raises(ModelError, match="model.norm.weight"):
        build_llama(dims, {k: v for k, v in weights.items() if k != "model.norm.weight"})


# --- checkpoint key handling -------------------------------------------------------------------

@pytest.fixture(scope="session")
def official_ckpt():
    return torch.load(OFFICIAL_TINY / "salmonn_tiny.pth", map_location="cpu", weights_only=True)


def write_variant(tmp_path, ckpt, state):
    path = tmp_path / "variant.pth"
    torch.save({**ckpt, "model": state}, path)
    return path


def assert_same_trained_tensors(a: Salmonn, b: Salmonn):
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_old_lora_spelling_loads_the_same_model(official, official_ckpt, tmp_path):
    state = {k.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight"): v
             for k, v in official_ckpt["model"].items()}
    assert any(k.endswith(".lora_A.weight") for k in state)
    # a bare state dict (no 'model'/'config' wrapper) is accepted too
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    model, cfg = load_official(*official_paths(ckpt=path))
    assert cfg == official[1]
    assert_same_trained_tensors(model, official[0])


def test_renamed_key_is_named(official_ckpt, tmp_path):
    key = "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.bias"
    state = dict(official_ckpt["model"])
    state[key.replace("crossattention", "crossattn")] = state.pop(key)
    with pytest.raises(ModelError, match="crossattn"):
        load_official(*official_paths(ckpt=write_variant(tmp_path, official_ckpt, state)))


def test_missing_key_is_named(official, official_ckpt, tmp_path):
    key = "ln_audio.bias"
    state = {k: v for k, v in official_ckpt["model"].items() if k != key}
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        load_checkpoint_into(official[0], write_variant(tmp_path, official_ckpt, state))


def test_beats_alias_must_match_beats_file(official, official_ckpt, tmp_path):
    key = "beats.encoder.layers.1.self_attn.relative_attention_bias.weight"
    state = dict(official_ckpt["model"])
    state[key] = state[key] + 1.0
    with pytest.raises(ModelError, match="relative_attention_bias"):
        load_checkpoint_into(official[0], write_variant(tmp_path, official_ckpt, state))


def test_save_official_format_round_trip(official, tmp_path):
    model, cfg = official
    path = tmp_path / "ours.pth"
    save_official_format(model, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved["model"]) == set(model.trainable_state_dict())
    reloaded, reloaded_cfg = load_official(*official_paths(ckpt=path))
    assert reloaded_cfg == cfg
    assert_same_trained_tensors(reloaded, model)


def test_random_model_round_trip_keeps_qformer_heads(tmp_path):
    cfg = presets.tiny()               # Q-Former hidden 96 with 4 heads: not the hidden // 64 default
    torch.manual_seed(0)
    source = Salmonn(cfg)
    path = tmp_path / "tiny.pth"
    save_official_format(source, path)
    target = Salmonn(cfg)
    load_checkpoint_into(target, path)
    assert_same_trained_tensors(target, source)
    assert torch.load(path, weights_only=True)["config"]["model"]["qformer_heads"] == 4


def test_llm_with_pad_row(official, reference, tmp_path):
    """An LLM saved after the official [PAD] resize (32001 rows) loads; ids < 32000 are unchanged."""
    from safetensors.torch import load_file, save_file

    llm_dir = tmp_path / "vicuna32001"
    shutil.copytree(OFFICIAL_TINY / "vicuna", llm_dir)
    weights = load_file(llm_dir / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = torch.cat([weights[key], weights[key].mean(0, keepdim=True)])
    (llm_dir / "model.safetensors").unlink()
    save_file(weights, llm_dir / "model.safetensors")
    assert read_llm_dims(llm_dir).vocab_size == 32001
    model, _ = load_official(*official_paths(llm_dir=llm_dir))
    embeds = torch.from_numpy(reference["speech.llm_input_embeds"])
    assert max_diff(last_logits(model, embeds), reference["speech.last_logits"]) <= LLM_ATOL


def test_weightless_llm_keeps_audio_path_and_lora(official, official_ckpt, reference):
    """llm_weights=False (what export uses): the frozen LLM base stays on the meta device, every
    trained tensor and the whole audio path are real; audio_embeds vs reference within 1e-4."""
    model, cfg = load_official(*official_paths(), llm_weights=False)
    assert cfg == official[1]
    base = {n for n, p in model.named_parameters() if n.startswith("llama_model.") and not is_trainable_name(n)}
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in base
    for name, param in model.named_parameters():
        assert param.is_meta == (name in base), name
    assert not any(b.is_meta for n, b in model.named_buffers() if not n.startswith("llama_model."))
    trained = model.trainable_state_dict()
    lora_keys = [k for k in official_ckpt["model"] if ".lora_" in k]
    assert len(lora_keys) == 8
    for key in lora_keys:
        assert torch.equal(trained[key], official_ckpt["model"][key]), key
    assert_same_trained_tensors(model, official[0])
    encoder = model.audio_encoder()
    with torch.no_grad():
        for name in INPUTS:
            tokens = encoder(torch.from_numpy(reference[f"{name}.mel"]),
                             torch.from_numpy(reference[f"{name}.beats_fbank"]))
            diff = max_diff(tokens, reference[f"{name}.audio_embeds"][0])
            print(f"weightless {name}.audio_embeds max abs diff {diff:.2e}")
            assert diff <= EMBED_ATOL
