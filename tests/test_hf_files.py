"""train/hf_files.py: the one reader of HF model folders (weights and LLaMA config).

Tensor values are compared exactly: BF16/F16 -> float32 widening is exact.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from salmonn_cli.errors import ModelError
from train.hf_files import open_checkpoint, read_llm_dims, read_tensors

from conftest import OFFICIAL_TINY, REPO

VICUNA = OFFICIAL_TINY / "vicuna"


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f32": torch.randn(2, 2, generator=g),
        "ids": torch.arange(6, dtype=torch.int64).reshape(1, 6),
    }


def _check_reader(reader, tensors):
    assert set(reader.names()) == set(tensors)
    for name, t in tensors.items():
        assert reader.shape(name) == tuple(t.shape)
        got = reader.load(name)
        if t.is_floating_point():
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, t.float().numpy())
        else:
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, t.numpy())


def test_safetensors_any_dtype(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    _check_reader(open_checkpoint(tmp_path), tensors)
    assert set(read_tensors(tmp_path, select=lambda n: n.startswith("f"))) == {"f16", "f32"}


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_bin_zip_and_legacy(tmp_path, zip_format):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    _check_reader(open_checkpoint(tmp_path), tensors)


def test_bad_folders_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="has no"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        open_checkpoint(tmp_path)
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    reader = open_checkpoint(tmp_path)
    with pytest.raises(ModelError, match="truncated"):
        for name in reader.names():
            reader.load(name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ModelError, match="gone.safetensors"):
        open_checkpoint(tmp_path)


def _llm_dir(tmp_path, config_updates=None, generation=None):
    d = tmp_path / "llm"
    d.mkdir()
    (d / "model.safetensors").symlink_to(VICUNA / "model.safetensors")
    config = {**json.loads((VICUNA / "config.json").read_text()), **(config_updates or {})}
    (d / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def test_llm_dims_of_the_fixture():
    dims = read_llm_dims(VICUNA)
    assert (dims.hidden_size, dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.intermediate_size) == (64, 2, 4, 4, 128)
    assert (dims.vocab_size, dims.bos_token_id, dims.eos_token_id, dims.rope_theta) == (32000, 1, 2, 10000.0)


def test_llm_dims_token_ids_prefer_generation_config(tmp_path):
    d = _llm_dir(tmp_path, {"bos_token_id": 5, "eos_token_id": 6, "vocab_size": 99},
                 generation={"bos_token_id": 7, "eos_token_id": [8, 9]})
    dims = read_llm_dims(d)
    assert (dims.bos_token_id, dims.eos_token_id) == (7, 8)
    assert dims.vocab_size == 32000         # the embedding's rows, not config.json's vocab_size
    (d / "generation_config.json").unlink()
    assert (read_llm_dims(d).bos_token_id, read_llm_dims(d).eos_token_id) == (5, 6)


def test_llm_dims_transformers5_rope_parameters(tmp_path):
    config = {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rope_theta": None}
    assert read_llm_dims(_llm_dir(tmp_path, config)).rope_theta == 500000.0


@pytest.mark.parametrize("update,message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"hidden_size": None}, "cannot read the LLM config"),
])
def test_llm_dims_unsupported_configs(tmp_path, update, message):
    with pytest.raises(ModelError, match=message):
        read_llm_dims(_llm_dir(tmp_path, update))


def test_llm_dims_checks_vocab_rows(tmp_path):
    d = tmp_path / "llm"
    d.mkdir()
    shutil.copy(VICUNA / "config.json", d / "config.json")
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(11, 4)},
              d / "model.safetensors")
    with pytest.raises(ModelError, match="lm_head.weight has 11 rows but the embedding 10"):
        read_llm_dims(d)
    save_file({"lm_head.weight": torch.zeros(11, 4)}, d / "model.safetensors")
    with pytest.raises(ModelError, match="lack 'model.embed_tokens.weight'"):
        read_llm_dims(d)


def test_module_does_not_import_torch():
    code = ("import sys, train.hf_files; "
            f"train.hf_files.read_llm_dims({str(VICUNA)!r}); "
            "sys.exit('imported torch' if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
