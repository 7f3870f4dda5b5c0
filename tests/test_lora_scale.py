"""`lora_scale`: the LoRA adapter GGUF written by export, applied by llama.cpp on top of the merged
model with scale (F - merged), against the PyTorch model with `model.lora_scale = F`.

Tolerances: f32 GGUF with exact attention vs PyTorch last logits 5e-4 abs (fixture README's
suggestion for logits; measured <= 4.7e-6 at every scale tested). q8_0 base + f32 adapter vs
PyTorch 0.5 abs (tests/test_llm.py's q8_0 bound; measured 0.15). Greedy ids exact.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from export.export import LORA_ADAPTER_FILE
from export.gguf import (ADAPTER_MERGED_SCALE_KEY, official_lora_pairs, permute_rotary_rows,
                         write_lora_adapter_gguf)
from export.quantize import quantize_gguf
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import ModelError, SalmonnError
from salmonn_cli.llm import LlamaModel
from salmonn_cli.manifest import MANIFEST_NAME, load_manifest
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
from train.official import load_official

from conftest import OFFICIAL_TINY, REFERENCE_INPUTS

EXACT_TOL = 5e-4
Q8_TOL = 0.5
N_CTX = 128                  # 110 prompt positions + 8 generated
GREEDY_STEPS = 8
REFERENCE_VOCAB = 32000      # reference logits cover ids 0..31999 only
MIN_GREEDY_GAP = 1e-3        # the PyTorch top-1/top-2 gap must dwarf float32 noise
PROMPT = "Describe the audio."          # the reference's instruction (reference.json)
SCALES = (0.0, 2.0, 8.0)
INPUTS = list(REFERENCE_INPUTS)


@pytest.fixture(scope="module")
def exported(model_f32):
    return model_f32


@pytest.fixture(scope="module")
def official():
    torch.set_num_threads(1)
    return load_official(OFFICIAL_TINY / "salmonn_tiny.pth", OFFICIAL_TINY / "whisper",
                         OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna")


@pytest.fixture(scope="module")
def merged_scale(official):
    return official[1].lora.scale


def torch_logits(official, embeds: np.ndarray, scale: float) -> np.ndarray:
    """Last-position logits of the PyTorch model at LoRA `scale`; scale 0 runs the base LLM with
    the adapters disabled."""
    model, config = official
    with torch.no_grad():
        if scale == 0.0:
            with model.llama_model.disable_adapter():
                out = model.llama_model(inputs_embeds=torch.from_numpy(embeds))
        else:
            try:
                model.lora_scale = scale
                out = model.llama_model(inputs_embeds=torch.from_numpy(embeds))
            finally:
                model.lora_scale = config.lora.scale
    return out.logits[0, -1, :REFERENCE_VOCAB].numpy()


def torch_greedy(official, embeds: np.ndarray, scale: float) -> list[int]:
    model, _ = official
    ids = []
    for _ in range(GREEDY_STEPS):
        logits = torch_logits(official, embeds, scale)
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > MIN_GREEDY_GAP, "greedy choice too close to call"
        ids.append(int(logits.argmax()))
        with torch.no_grad():
            embeds = np.concatenate([embeds, model.embed_ids([ids[-1]]).numpy()], axis=1)
    return ids


def llama_logits(llm: LlamaModel, embeds: np.ndarray) -> np.ndarray:
    return llm.decode_embeddings(embeds[0], 0)[:REFERENCE_VOCAB]


@pytest.fixture(scope="module")
def exact_llm(exported):
    with LlamaModel(exported / "llm-f32.gguf", n_ctx=N_CTX, n_threads=1, exact=True) as llm:
        llm.load_lora_adapter(exported / LORA_ADAPTER_FILE)
        yield llm


# --- export ----------------------------------------------------------------------------------------

def test_export_writes_and_names_the_adapter(exported):
    d = json.loads((exported / MANIFEST_NAME).read_text())
    assert d["format_version"] == 1
    assert d["lora_adapter"] == LORA_ADAPTER_FILE and LORA_ADAPTER_FILE in d["files"]
    assert load_manifest(exported).lora_adapter == LORA_ADAPTER_FILE


def test_adapter_gguf_layout(exported, official, merged_scale):
    _, config = official
    reader = GGUFReader(exported / LORA_ADAPTER_FILE)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert "adapter.lora.alpha" not in fields         # llama.cpp then scales B @ A by exactly the scale
    assert fields[ADAPTER_MERGED_SCALE_KEY] == pytest.approx(merged_scale)

    ckpt = torch.load(OFFICIAL_TINY / "salmonn_tiny.pth", map_location="cpu", weights_only=True)
    lora = official_lora_pairs(ckpt["model"])
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    expected = set()
    for n in range(config.llm.n_layers):
        for module, short in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            a, b = lora[f"model.layers.{n}.self_attn.{module}"]
            if module == "q_proj":
                b = permute_rotary_rows(b, config.llm.n_heads)
            base = f"blk.{n}.{short}.weight"
            expected |= {f"{base}.lora_a", f"{base}.lora_b"}
            assert tensors[f"{base}.lora_a"].dtype == np.float32
            np.testing.assert_array_equal(tensors[f"{base}.lora_a"], a)      # (r, in), as peft's A
            np.testing.assert_array_equal(tensors[f"{base}.lora_b"], b)      # (out, r), as peft's B
    assert set(tensors) == expected


def test_adapter_writer_rejects_what_llama_cpp_cannot_apply(tmp_path, official):
    dims = official[1].llm
    r, h = 2, dims.hidden_size
    good = (np.zeros((r, h), np.float32), np.zeros((h, r), np.float32))
    with pytest.raises(ModelError, match="no LoRA weights"):
        write_lora_adapter_gguf(tmp_path / "a.gguf", dims, {})
    with pytest.raises(ModelError, match="not a weight matrix"):
        write_lora_adapter_gguf(tmp_path / "a.gguf", dims, {"lm_head": good})
    with pytest.raises(ModelError, match="do not fit"):
        write_lora_adapter_gguf(tmp_path / "a.gguf", dims,
                                {"model.layers.0.self_attn.q_proj": (good[0], good[1][:-1])})


# --- llama.cpp with the adapter vs PyTorch ---------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", INPUTS)
def test_lora_scale_matches_pytorch(exact_llm, official, reference, merged_scale, name, scale):
    embeds = reference[f"{name}.llm_input_embeds"]
    exact_llm.set_lora_scale(scale - merged_scale)
    got = llama_logits(exact_llm, embeds)
    expected = torch_logits(official, embeds, scale)
    diff = float(np.abs(got - expected).max())
    moved = float(np.abs(expected - reference[f"{name}.last_logits"][0]).max())
    print(f"{name} scale {scale}: max |dlogit| vs PyTorch {diff:.2e} (scale moves logits by {moved:.2f})")
    assert diff <= EXACT_TOL
    assert moved > 1.0           # fixture README: LoRA off moves them by >= 5.1, scale 2 by >= 2.6


@pytest.mark.parametrize("name", INPUTS)
def test_default_scale_is_the_merged_model(exact_llm, reference, name):
    exact_llm.set_lora_scale(0.0)
    got = llama_logits(exact_llm, reference[f"{name}.llm_input_embeds"])
    assert float(np.abs(got - reference[f"{name}.last_logits"][0]).max()) <= EXACT_TOL


def test_changing_the_scale_clears_the_cache_and_round_trips(exact_llm, reference, merged_scale):
    embeds = reference["speech.llm_input_embeds"]
    exact_llm.set_lora_scale(0.0)
    before = llama_logits(exact_llm, embeds)
    exact_llm.set_lora_scale(-merged_scale)
    assert exact_llm.n_past == 0 and exact_llm.lora_scale == -merged_scale
    assert float(np.abs(llama_logits(exact_llm, embeds) - before).max()) > 1.0
    exact_llm.set_lora_scale(0.0)
    np.testing.assert_allclose(llama_logits(exact_llm, embeds), before, rtol=0, atol=1e-6)


def test_adapter_on_a_quantized_base(exported, tmp_path, official, reference, merged_scale):
    q8 = tmp_path / "llm-q8_0.gguf"
    quantize_gguf(exported / "llm-f32.gguf", q8, "q8_0", n_threads=1)
    embeds = reference["speech.llm_input_embeds"]
    with LlamaModel(q8, n_ctx=N_CTX, n_threads=1) as llm:
        llm.load_lora_adapter(exported / LORA_ADAPTER_FILE)
        for scale in (0.0, 2.0):
            llm.set_lora_scale(scale - merged_scale)
            diff = float(np.abs(llama_logits(llm, embeds) - torch_logits(official, embeds, scale)).max())
            print(f"q8_0 scale {scale}: max |dlogit| vs PyTorch {diff:.3f}")
            assert diff <= Q8_TOL


# --- the runtime API ------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", (0.0, 2.0))
def test_pipeline_answers_with_the_requested_scale(exported, official, reference, scale):
    expected = torch_greedy(official, reference["speech.llm_input_embeds"], scale)
    with Pipeline(exported, RuntimeOptions(n_threads=1, lora_scale=scale), DecodingOptions(max_tokens=GREEDY_STEPS)) as pipe:
        answer = pipe.answer(reference["speech.audio_embeds"][0], PROMPT,
                             DecodingOptions(max_tokens=GREEDY_STEPS))
    assert answer.tokens == expected
    assert answer.tokens != reference["speech.greedy_ids"][0, 1:].tolist()


def test_pipeline_default_scale_loads_no_adapter(exported, reference, merged_scale):
    with Pipeline(exported, RuntimeOptions(n_threads=1, lora_scale=merged_scale), DecodingOptions(max_tokens=GREEDY_STEPS)) as pipe:
        assert pipe.llm.lora_scale == 0.0
        answer = pipe.answer(reference["speech.audio_embeds"][0], PROMPT,
                             DecodingOptions(max_tokens=GREEDY_STEPS))
    assert answer.tokens == reference["speech.greedy_ids"][0, 1:].tolist()


def _copy_without_adapter(exported, out):
    """A model directory as exported before the adapter existed (its files linked, not copied)."""
    out.mkdir()
    d = json.loads((exported / MANIFEST_NAME).read_text())
    del d["lora_adapter"]
    del d["files"][LORA_ADAPTER_FILE]
    for name in d["files"]:
        os.symlink(exported / name, out / name)
    (out / MANIFEST_NAME).write_text(json.dumps(d))
    return d


def test_model_without_adapter_still_loads_but_refuses_a_scale(exported, tmp_path):
    old = tmp_path / "old"
    _copy_without_adapter(exported, old)
    assert load_manifest(old).lora_adapter is None
    with pytest.raises(ModelError) as e:
        Pipeline(old, RuntimeOptions(n_threads=1, lora_scale=2.0), DecodingOptions(max_tokens=GREEDY_STEPS))
    message = str(e.value)
    assert "no LoRA adapter" in message and "re-export" in message and "\n" not in message
    with Pipeline(old, RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=GREEDY_STEPS)) as pipe:
        assert pipe.llm.lora_scale == 0.0


def test_manifest_naming_an_unlisted_adapter_is_malformed(exported, tmp_path):
    bad = tmp_path / "bad"
    d = _copy_without_adapter(exported, bad)
    d["lora_adapter"] = LORA_ADAPTER_FILE
    (bad / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError, match="does not list 'lora-adapter.gguf'"):
        load_manifest(bad)


def test_bad_scale_and_bad_adapter_file(exported, exact_llm):
    with pytest.raises(SalmonnError, match="finite"):
        Pipeline(exported, RuntimeOptions(n_threads=1, lora_scale=float("nan")), DecodingOptions(max_tokens=GREEDY_STEPS))
    with pytest.raises(ModelError, match="not found"):
        exact_llm.load_lora_adapter(exported / "missing.gguf")
    with pytest.raises(ModelError, match="cannot load the LoRA adapter"):
        exact_llm.load_lora_adapter(exported / "llm-f32.gguf")      # a model, not an adapter
    with LlamaModel(exported / "llm-f32.gguf", n_ctx=N_CTX, n_threads=1) as llm:
        with pytest.raises(ValueError, match="no LoRA adapter is loaded"):
            llm.set_lora_scale(1.0)
