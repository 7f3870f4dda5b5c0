"""train/beats.py against the official BEATs: strict load of the fixture's beats.pt, forward parity
with reference.npz, dynamic-length ONNX export run in ONNX Runtime, and key-mismatch errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import OFFICIAL_TINY
from salmonn_cli.config import BeatsDims
from salmonn_cli.errors import ModelError
from train.beats import BEATs, load_beats, relative_position_buckets

BEATS_PT = OFFICIAL_TINY / "beats.pt"
INPUTS = ("speech", "long", "short")
# fixture README: encoder outputs of an independent fp32 implementation within 1e-4 abs
# (measured: torch <= 1.9e-6 vs reference, ORT <= 4e-6 vs torch)
OUT_ATOL = 1e-4
ONNX_ATOL = 1e-4
MIN_FRAMES = 16


@pytest.fixture(scope="module")
def beats():
    torch.set_num_threads(2)
    return load_beats(BEATS_PT)


@pytest.fixture(scope="module")
def torch_outputs(beats, reference):
    with torch.inference_mode():
        return {name: beats(torch.from_numpy(reference[f"{name}.beats_fbank"])).numpy() for name in INPUTS}


@pytest.fixture(scope="module")
def onnx_session(beats, reference, tmp_path_factory):
    import onnx
    import onnxruntime as ort

    path = tmp_path_factory.mktemp("beats_onnx") / "beats.onnx"
    example = torch.from_numpy(reference["speech.beats_fbank"])
    frames = torch.export.Dim("F", min=MIN_FRAMES)
    torch.onnx.export(beats, (example,), str(path), dynamo=True, opset_version=18,
                      input_names=["fbank"], output_names=["features"],
                      dynamic_shapes={"fbank": {1: frames}}, external_data=False)
    # the exporter may silently fall back to a static graph: the frame axis must stay symbolic
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param and not dims[1].HasField("dim_value"), dims
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_strict_load_of_official_checkpoint(beats):
    checkpoint = torch.load(BEATS_PT, map_location="cpu", weights_only=True)
    state = beats.state_dict()
    assert list(state) and set(state) == set(checkpoint["model"])
    for key, value in checkpoint["model"].items():
        assert torch.equal(state[key], value), key
    # one shared relative-position table, listed under every layer as in the official file
    tables = {beats.encoder.layers[i].self_attn.relative_attention_bias.weight.data_ptr()
              for i in range(len(beats.encoder.layers))}
    assert len(tables) == 1
    assert not beats.training


@pytest.mark.parametrize("name", INPUTS)
def test_forward_matches_official(torch_outputs, reference, name):
    out, ref = torch_outputs[name], reference[f"{name}.beats_out"]
    fbank_frames = reference[f"{name}.beats_fbank"].shape[1]
    assert out.shape == ref.shape == (1, 8 * (fbank_frames // 16), 48)
    np.testing.assert_allclose(out, ref, rtol=0, atol=OUT_ATOL)


@pytest.mark.parametrize("name", INPUTS)
def test_onnx_matches_torch(onnx_session, torch_outputs, reference, name):
    (out,) = onnx_session.run(None, {"fbank": reference[f"{name}.beats_fbank"]})
    assert out.shape == torch_outputs[name].shape
    np.testing.assert_allclose(out, torch_outputs[name], rtol=0, atol=ONNX_ATOL)


def test_token_count_for_uneven_frames(beats):
    with torch.inference_mode():
        out = beats(torch.zeros(1, 37, 128))                # 37 frames -> 2 time patches
    assert out.shape == (1, 16, 48)


def test_buckets_exact_near_and_log_spaced_far():
    distance = torch.tensor([-2000, -800, -81, -80, -79, -1, 0, 1, 79, 80, 81, 800, 2000])
    buckets = relative_position_buckets(distance, num_buckets=320, max_distance=800)
    # negatives in 0..159, positives in 160..319; |d| < 80 exact; far distances saturate
    assert buckets.tolist() == [159, 159, 80, 80, 79, 1, 0, 161, 239, 240, 240, 319, 319]


def _save_checkpoint(tmp_path, change):
    checkpoint = torch.load(BEATS_PT, map_location="cpu", weights_only=True)
    change(checkpoint["model"])
    path = tmp_path / "beats.pt"
    torch.save(checkpoint, path)
    return path


def test_missing_key_raises_model_error(tmp_path):
    path = _save_checkpoint(tmp_path, lambda sd: sd.pop("encoder.layers.1.fc2.bias"))
    with pytest.raises(ModelError, match=r"missing 1 key \(encoder\.layers\.1\.fc2\.bias\)"):
        load_beats(path)


def test_unexpected_key_raises_model_error(tmp_path):
    path = _save_checkpoint(tmp_path, lambda sd: sd.update({"encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelError, match=r"unexpected 1 key \(encoder\.extra\.weight\)"):
        load_beats(path)


def test_wrong_shape_raises_model_error(tmp_path):
    path = _save_checkpoint(tmp_path, lambda sd: sd.update({"layer_norm.bias": torch.zeros(3)}))
    with pytest.raises(ModelError, match=r"layer_norm\.bias"):
        load_beats(path)


def test_not_a_checkpoint_raises_model_error(tmp_path):
    path = tmp_path / "beats.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read BEATs checkpoint"):
        load_beats(path)


def test_unsupported_config_raises_model_error():
    with pytest.raises(ModelError, match="activation_fn 'glu'"):
        BEATs(BeatsDims(activation_fn="glu"))


def test_pre_ln_variant_runs_without_relative_bias():
    dims = BeatsDims(embed_dim=16, encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=32,
                     encoder_attention_heads=2, conv_pos_groups=4, layer_norm_first=True,
                     deep_norm=False, relative_position_embedding=False, gru_rel_pos=False,
                     finetuned_model=False)
    model = BEATs(dims).eval()
    keys = set(model.state_dict())
    assert "post_extract_proj.weight" not in keys and "predictor.weight" not in keys
    assert not any("relative_attention_bias" in k or "grep" in k for k in keys)
    with torch.inference_mode():
        out = model(torch.randn(1, 32, 128))
    assert out.shape == (1, 16, 16) and torch.isfinite(out).all()
