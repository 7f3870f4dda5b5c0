"""GGUF export (LoRA merged), llama.cpp quantization and the llama.cpp runtime, against the
official-tiny fixture's reference outputs.

Tolerances: f32 with exact attention vs official logits 5e-4 abs (fixture README; measured
<= 4.0e-6). Quantized models run with default (fast) settings and are compared teacher-forced
(reference ids fed back) over the 8 greedy steps; bounds are ~3x the measured max |dlogit|:
f16 0.0185 -> 0.05, q8_0 0.175 -> 0.5, q4_k_m 0.79 -> 2.0.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from export.gguf import merge_lora, official_lora_pairs, permute_rotary_rows, write_llama_gguf
from export.quantize import QUANT_TYPES, quantize_gguf
from salmonn_cli.errors import ModelError
from salmonn_cli.llm import ContextOverflowError, LlamaModel
from train.hf_files import read_llm_dims

from conftest import OFFICIAL_TINY, REPO

VICUNA = OFFICIAL_TINY / "vicuna"
INPUTS = ("speech", "long", "short")
N_CTX = 128                 # 110 prompt positions + 8 generated
EXACT_TOL = 5e-4
QUANT_TOL = {"f16": 0.05, "q8_0": 0.5, "q4_k_m": 2.0}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def official_lora():
    torch.set_num_threads(1)
    ckpt = torch.load(OFFICIAL_TINY / "salmonn_tiny.pth", map_location="cpu", weights_only=True)
    cfg = ckpt["config"]["model"]
    return official_lora_pairs(ckpt["model"]), cfg["lora_alpha"] / cfg["lora_rank"]


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory, official_lora):
    """f32 written by export.gguf; f16, q8_0, q4_k_m quantized from it by llama.cpp."""
    lora, scale = official_lora
    out = tmp_path_factory.mktemp("gguf")
    calls = []
    write_llama_gguf(out / "f32.gguf", VICUNA, read_llm_dims(VICUNA), lora, scale, "f32",
                     progress=lambda done, total: calls.append((done, total)))
    paths = {"f32": out / "f32.gguf", "progress": calls}
    for quant in ("f16", "q8_0", "q4_k_m"):
        quantize_gguf(paths["f32"], out / f"{quant}.gguf", quant, n_threads=1)
        paths[quant] = out / f"{quant}.gguf"
    return paths


@pytest.fixture(scope="session")
def f32_reader(ggufs):
    return GGUFReader(ggufs["f32"])


@pytest.fixture(scope="session")
def exact_llm(ggufs):
    with LlamaModel(ggufs["f32"], n_ctx=N_CTX, n_threads=1, exact=True) as llm:
        yield llm


def _tensor(reader: GGUFReader, name: str) -> np.ndarray:
    return next(t for t in reader.tensors if t.name == name).data


def _greedy(llm: LlamaModel, embeds: np.ndarray, n_steps: int):
    """Greedy ids and the logits that chose them, feeding each chosen id back."""
    llm.reset()
    logits = [llm.decode_embeddings(embeds, 0)]
    ids = [int(logits[-1].argmax())]
    for _ in range(n_steps - 1):
        logits.append(llm.decode_tokens([ids[-1]]))
        ids.append(int(logits[-1].argmax()))
    return ids, np.stack(logits)


def _teacher_forced(llm: LlamaModel, embeds: np.ndarray, ids) -> np.ndarray:
    llm.reset()
    logits = [llm.decode_embeddings(embeds, 0)]
    for token in ids[:-1]:
        logits.append(llm.decode_tokens([int(token)]))
    return np.stack(logits)


# --- export pieces -------------------------------------------------------------------------------

def test_merge_lora_is_w_plus_scaled_b_a():
    rng = np.random.default_rng(0)
    w, a, b = rng.normal(size=(6, 5)), rng.normal(size=(2, 5)), rng.normal(size=(6, 2))
    merged = merge_lora(w, a, b, 4.0)
    assert merged.dtype == np.float32
    np.testing.assert_allclose(merged, w + 4.0 * b @ a, atol=1e-5)


def test_permute_rotary_rows_pairs_halves_of_each_head():
    n_heads, head_dim = 2, 8
    w = np.arange(n_heads * head_dim, dtype=np.float32)[:, None]
    out = permute_rotary_rows(w, n_heads)[:, 0]
    # per head, rotate-half pair (j, j + head_dim/2) becomes adjacent rows (2j, 2j+1)
    assert out[:head_dim].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert out[head_dim:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_layout_hparams_and_merged_weights(ggufs, f32_reader, official_lora):
    lora, scale = official_lora
    reader = f32_reader
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"],
            fields["llama.feed_forward_length"]) == (2, 64, 128)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 4)
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.context_length"] == 2048 and fields["llama.vocab_size"] == 32000
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["general.file_type"] == 0
    assert fields["tokenizer.ggml.model"] == "llama"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_eos_token"] is False
    types = np.array(reader.fields["tokenizer.ggml.token_type"].contents())
    assert [(types == t).sum() for t in (1, 2, 3, 6)] == [31741, 1, 2, 256]

    names = {t.name for t in reader.tensors}
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                 "attn_norm", "ffn_norm"]
    assert names == ({"token_embd.weight", "output_norm.weight", "output.weight"}
                     | {f"blk.{n}.{t}.weight" for n in range(2) for t in per_layer})
    assert ggufs["progress"] == [(i, 21) for i in range(1, 22)]

    hf = load_file(VICUNA / "model.safetensors")
    a, b = lora["model.layers.1.self_attn.q_proj"]
    q = permute_rotary_rows(hf["model.layers.1.self_attn.q_proj.weight"] + scale * b @ a, 4)
    np.testing.assert_allclose(_tensor(reader, "blk.1.attn_q.weight"), q, atol=1e-6)
    a, b = lora["model.layers.0.self_attn.v_proj"]
    v = hf["model.layers.0.self_attn.v_proj.weight"] + scale * b @ a
    np.testing.assert_allclose(_tensor(reader, "blk.0.attn_v.weight"), v, atol=1e-6)
    k = permute_rotary_rows(hf["model.layers.0.self_attn.k_proj.weight"], 4)
    np.testing.assert_array_equal(_tensor(reader, "blk.0.attn_k.weight"), k)
    np.testing.assert_array_equal(_tensor(reader, "output.weight"), hf["lm_head.weight"])


def test_f16_export_keeps_norms_f32_and_decodes(tmp_path, official_lora, reference):
    lora, scale = official_lora
    path = tmp_path / "f16.gguf"
    write_llama_gguf(path, VICUNA, read_llm_dims(VICUNA), lora, scale, "f16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {"F16"}
    with LlamaModel(path, n_ctx=N_CTX, n_threads=1, exact=True) as llm:
        logits = llm.decode_embeddings(reference["speech.llm_input_embeds"][0])
    # fixture weights are fp16-exact; only LoRA-merged q/v are rounded (measured 0.0031)
    assert np.abs(logits - reference["speech.last_logits"][0]).max() < 0.02


# --- runtime against the official reference ----------------------------------------------------

def test_tokenizer_matches_official_prompt_ids(exact_llm, reference_json):
    assert exact_llm.tokenize(reference_json["p_before"]) == reference_json["ids_before"]
    assert exact_llm.tokenize(reference_json["p_after"]) == reference_json["ids_after"]
    assert exact_llm.tokenize("Hello world", add_bos=True) == [1, 15043, 3186]
    assert exact_llm.tokenize("</s>") != [exact_llm.eos_id]     # special text is plain text
    assert exact_llm.token_to_bytes(15043) == b" Hello"
    assert exact_llm.token_to_bytes(exact_llm.eos_id) == b""
    assert exact_llm.token_to_bytes(exact_llm.eos_id, special=True) == b"</s>"
    assert (exact_llm.bos_id, exact_llm.eos_id) == (1, 2)
    assert (exact_llm.n_embd, exact_llm.n_vocab, exact_llm.n_ctx) == (64, 32000, N_CTX)


@pytest.mark.parametrize("name", INPUTS)
def test_f32_exact_matches_official_logits_and_greedy_ids(exact_llm, reference, name):
    embeds = reference[f"{name}.llm_input_embeds"][0]
    ref_ids = reference[f"{name}.greedy_ids"][0, 1:].tolist()
    ref_logits = reference[f"{name}.greedy_step_logits"]
    ids, logits = _greedy(exact_llm, embeds, len(ref_ids))
    first = np.abs(logits[0] - reference[f"{name}.last_logits"][0]).max()
    steps = np.abs(logits - ref_logits).max()
    print(f"{name}: last_logits max|d| {first:.2e}, 8 greedy steps max|d| {steps:.2e}")
    assert first < EXACT_TOL
    assert ids == ref_ids
    assert steps < EXACT_TOL
    assert exact_llm.n_past == embeds.shape[0] + len(ref_ids) - 1


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_quantized_models_decode_close_to_reference(ggufs, reference, quant):
    worst = 0.0
    with LlamaModel(ggufs[quant], n_ctx=N_CTX, n_threads=1) as llm:
        for name in INPUTS:
            ref_ids = reference[f"{name}.greedy_ids"][0, 1:]
            logits = _teacher_forced(llm, reference[f"{name}.llm_input_embeds"][0], ref_ids)
            assert np.isfinite(logits).all()
            worst = max(worst, float(np.abs(logits - reference[f"{name}.greedy_step_logits"]).max()))
            if quant in ("f16", "q8_0"):
                assert int(logits[0].argmax()) == ref_ids[0]
    print(f"{quant}: teacher-forced max|dlogit| {worst:.4f}")
    assert worst < QUANT_TOL[quant]


def test_rewinding_start_pos_recomputes_from_there(exact_llm, reference):
    embeds = reference["speech.llm_input_embeds"][0]
    exact_llm.reset()
    first = exact_llm.decode_embeddings(embeds, 0)
    exact_llm.decode_tokens([5, 6, 7])
    again = exact_llm.decode_embeddings(embeds[100:], 100)     # drops positions >= 100
    np.testing.assert_array_equal(first, again)
    assert exact_llm.n_past == embeds.shape[0]
    with pytest.raises(ValueError):
        exact_llm.decode_tokens([1], start_pos=exact_llm.n_past + 1)


def test_context_overflow_is_a_clear_error(exact_llm, reference):
    exact_llm.reset()
    exact_llm.decode_embeddings(reference["speech.llm_input_embeds"][0])
    with pytest.raises(ContextOverflowError, match="holds 128 tokens"):
        exact_llm.decode_tokens([5] * (N_CTX - 110 + 1))
    assert exact_llm.n_past == 110
    exact_llm.decode_tokens([5] * (N_CTX - 110))     # exactly full is fine


def test_truncated_gguf_raises_model_error(ggufs, tmp_path):
    data = ggufs["f32"].read_bytes()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        LlamaModel(bad, n_ctx=N_CTX, n_threads=1)
    assert "\n" not in str(err.value) and "half.gguf" in str(err.value)
    with pytest.raises(ModelError):
        quantize_gguf(bad, tmp_path / "q.gguf", "q8_0", n_threads=1)
    with pytest.raises(ModelError, match="not found"):
        LlamaModel(tmp_path / "missing.gguf", n_ctx=N_CTX, n_threads=1)
    with pytest.raises(ValueError):
        quantize_gguf(ggufs["f32"], tmp_path / "q.gguf", "q3_xyz")
    assert {"f32", "f16", "q8_0", "q4_k_m"} <= set(QUANT_TYPES)


def test_runtime_module_does_not_import_torch():
    code = ("import sys, salmonn_cli.llm; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- other checkpoint layouts --------------------------------------------------------------------

def _hf_dir(tmp_path, config_updates: dict):
    d = tmp_path / "llm"
    d.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(VICUNA / name, d / name)
    config = json.loads((VICUNA / "config.json").read_text())
    config.update(config_updates)
    (d / "config.json").write_text(json.dumps(config))
    return d, load_file(VICUNA / "model.safetensors")


def test_sharded_safetensors_with_tied_embeddings(tmp_path, official_lora, f32_reader, reference):
    lora, scale = official_lora
    d, weights = _hf_dir(tmp_path, {"tie_word_embeddings": True})
    del weights["lm_head.weight"]
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, d / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))

    out = tmp_path / "tied.gguf"
    write_llama_gguf(out, d, read_llm_dims(d), lora, scale, "f32")
    reader = GGUFReader(out)
    assert "output.weight" not in {t.name for t in reader.tensors}
    np.testing.assert_array_equal(_tensor(reader, "blk.1.attn_q.weight"),
                                  _tensor(f32_reader, "blk.1.attn_q.weight"))
    with LlamaModel(out, n_ctx=N_CTX, n_threads=1) as llm:
        assert np.isfinite(llm.decode_embeddings(reference["speech.llm_input_embeds"][0])).all()


def test_torch_bin_with_pad_row_drops_the_extra_row(tmp_path, official_lora, f32_reader):
    lora, scale = official_lora
    d, weights = _hf_dir(tmp_path, {"vocab_size": 32001})
    for name in ("model.embed_tokens.weight", "lm_head.weight"):     # official resize to 32001
        weights[name] = np.concatenate([weights[name], np.full((1, 64), 7.0, np.float32)])
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, d / "pytorch_model.bin")

    out = tmp_path / "bin.gguf"
    write_llama_gguf(out, d, read_llm_dims(d), lora, scale, "f32")
    got, want = GGUFReader(out), f32_reader
    assert _tensor(got, "token_embd.weight").shape == (32000, 64)
    for t in want.tensors:
        np.testing.assert_array_equal(_tensor(got, t.name), t.data, err_msg=t.name)


def test_bad_checkpoints_raise_model_error(tmp_path, official_lora):
    lora, scale = official_lora
    d, weights = _hf_dir(tmp_path, {})
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ModelError, match="lacks model.layers.1.mlp.up_proj.weight"):
        write_llama_gguf(tmp_path / "x.gguf", d, read_llm_dims(d), lora, scale)
    with pytest.raises(ModelError, match="LoRA targets"):
        write_llama_gguf(tmp_path / "x.gguf", VICUNA, read_llm_dims(VICUNA),
                         {"model.layers.9.self_attn.q_proj": lora["model.layers.0.self_attn.q_proj"]},
                         scale)
    (d / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="tokenizer.model"):
        write_llama_gguf(tmp_path / "x.gguf", d, read_llm_dims(d), lora, scale)


def test_gqa_tied_llama_matches_transformers(tmp_path):
    """A LLaMA shape the fixture lacks (2 KV heads for 4 heads, tied embeddings, rope_theta 5e5,
    transformers-5 config), with LoRA on q_proj, against transformers' own forward.
    Tolerance 1e-5 (measured 1.8e-7; permuting k with 4 instead of 2 heads moves logits ~1e-3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    lora_a, lora_b = torch.randn(8, 64) * 0.1, torch.randn(64, 8) * 0.1
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        model.save_pretrained(tmp_path)
        model.model.layers[1].self_attn.q_proj.weight += 4.0 * lora_b @ lora_a
        ids = torch.randint(3, 32000, (1, 48), generator=torch.Generator().manual_seed(1))
        expected = model(ids).logits[0].numpy()
    for name in TOKENIZER_FILES:
        shutil.copy(VICUNA / name, tmp_path / name)

    dims = read_llm_dims(tmp_path)
    assert (dims.n_kv_heads, dims.rope_theta, dims.tie_word_embeddings) == (2, 500000.0, True)
    lora = {"model.layers.1.self_attn.q_proj": (lora_a.numpy(), lora_b.numpy())}
    write_llama_gguf(tmp_path / "gqa.gguf", tmp_path, dims, lora, 4.0)
    with LlamaModel(tmp_path / "gqa.gguf", n_ctx=64, n_threads=1, exact=True) as llm:
        got = np.stack([llm.decode_tokens([int(i)]) for i in ids[0]])
    diff = np.abs(got - expected).max()
    print(f"GQA/tied vs transformers: max|d| {diff:.2e}")
    assert diff < 1e-5
