"""Small pure-Python parts: config geometry, decoding parts, manifest validation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from salmonn_cli import config as cfgmod
from salmonn_cli.decoding import (DecodingOptions, GreedyChooser, SamplingChooser, SuppressTokens, TextStream,
                                  decode, make_decoder, nucleus_probabilities, verify_options)
from salmonn_cli.errors import ModelError, SalmonnError
from salmonn_cli.manifest import FORMAT_VERSION, load_manifest, manifest_dict
from train import presets


def test_official_geometry():
    cfg = presets.official_13b()
    assert (cfg.window_frames, cfg.stride_frames, cfg.n_windows, cfg.n_audio_tokens) == (17, 17, 88, 88)
    assert cfg.fused_width == 2048
    assert cfg.lora.scale == 4.0
    before, after = cfg.prompt_pieces("  Describe the audio. ")
    assert before == "USER: <Speech>"
    assert after == "</Speech> Describe the audio.\nASSISTANT:"


def test_config_round_trip():
    for make in presets.PRESETS.values():
        cfg = make()
        assert cfgmod.SalmonnConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        cfgmod.SalmonnConfig.from_dict({"nonsense": 1})


def test_nucleus_keeps_smallest_set_reaching_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = nucleus_probabilities(logits, temperature=1.0, top_p=0.8)
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-12)
    probs = nucleus_probabilities(logits, temperature=1.0, top_p=1.0)
    np.testing.assert_allclose(probs, [0.5, 0.3, 0.15, 0.05], atol=1e-12)


def test_sampling_is_reproducible_with_a_seed():
    logits = np.random.default_rng(0).normal(size=50)
    a = [SamplingChooser(1.0, 0.9, seed=7)(logits) for _ in range(1)]
    draws = lambda: [c(logits) for c in [SamplingChooser(1.0, 0.9, seed=7)] for _ in range(20)]
    assert draws() == draws()
    assert a[0] == draws()[0]
    assert GreedyChooser()(logits) == int(np.argmax(logits))


def _fake_model(sequence, vocab=10):
    """A 'model' whose next logits put all mass on the next id of `sequence`."""
    it = iter(sequence)

    def logits_for(token_id):
        out = np.zeros(vocab)
        out[token_id] = 1.0
        return out

    first = logits_for(next(it))
    return first, lambda step: logits_for(next(it))


def greedy_decode(sequence, max_tokens, room, filters=()):
    first, advance = _fake_model(sequence)
    decoder = make_decoder(verify_options(DecodingOptions(max_tokens=max_tokens)), eos_id=2, room=room)
    return decode(first, advance, decoder, filters=filters)


def test_decoding_stops_at_eos_max_tokens_and_context():
    g = greedy_decode([5, 6, 2, 7], max_tokens=10, room=100)
    assert (g.tokens, g.stop_reason) == ([5, 6], "eos")
    g = greedy_decode([5, 6, 7, 8], max_tokens=3, room=100)
    assert (g.tokens, g.stop_reason) == ([5, 6, 7], "max_tokens")
    g = greedy_decode([5, 6, 7, 8], max_tokens=10, room=2)
    assert (g.tokens, g.stop_reason) == ([5, 6], "context_full")
    g = greedy_decode([9, 6, 2], max_tokens=10, room=100, filters=(SuppressTokens([9]),))
    assert g.tokens[0] != 9


def test_text_stream_joins_split_utf8_and_drops_leading_space():
    pieces = {1: " gr", 2: "ü".encode()[:1], 3: "ü".encode()[1:] + b"nd", 4: b" Zeit"}
    pieces = {k: v.encode() if isinstance(v, str) else v for k, v in pieces.items()}
    stream = TextStream(pieces.__getitem__)
    text = "".join(stream.push(t) for t in (1, 2, 3, 4)) + stream.flush()
    assert text == "gründ Zeit"


def _model_dir(tmp_path, version=FORMAT_VERSION):
    tmp_path.mkdir(parents=True)
    (tmp_path / "audio_encoder.onnx").write_bytes(b"onnx")
    (tmp_path / "llm-f32.gguf").write_bytes(b"gguf")
    d = manifest_dict(presets.tiny(), "audio_encoder.onnx", "llm-f32.gguf", "f32", tmp_path)
    d["format_version"] = version
    (tmp_path / "salmonn.json").write_text(json.dumps(d))
    return tmp_path


def test_manifest_round_trip_and_integrity(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = load_manifest(_model_dir(tmp_path / "m"))
    assert m.config == presets.tiny() and m.quant == "f32" and m.exact_attention
    load_manifest(tmp_path / "m")  # second time through the cache
    (tmp_path / "m" / "llm-f32.gguf").write_bytes(b"GGUF")  # same size, other bytes
    with pytest.raises(ModelError, match="sha256"):
        load_manifest(tmp_path / "m")
    (tmp_path / "m" / "llm-f32.gguf").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_manifest(tmp_path / "m")


def test_manifest_encoder_quant_defaults_to_fp32(tmp_path):
    model = _model_dir(tmp_path / "m")
    d = json.loads((model / "salmonn.json").read_text())
    assert d["encoder_quant"] == "fp32"
    del d["encoder_quant"]                 # manifests written before the int8 encoder existed
    (model / "salmonn.json").write_text(json.dumps(d))
    assert load_manifest(model, verify=False).encoder_quant == "fp32"
    for bad in ("int4", None, ["int8"]):
        (model / "salmonn.json").write_text(json.dumps({**d, "encoder_quant": bad}))
        with pytest.raises(ModelError, match="malformed"):
            load_manifest(model, verify=False)


def test_manifest_records_the_training_tasks_and_none_means_all(tmp_path):
    from salmonn_cli.transcribe import check_trained_for

    official = load_manifest(_model_dir(tmp_path / "official"), verify=False)
    assert official.tasks is None and official.trained_for("translation")
    check_trained_for(official, "de")
    model = _model_dir(tmp_path / "nano")
    d = json.loads((model / "salmonn.json").read_text())
    assert manifest_dict(presets.tiny(), "audio_encoder.onnx", "llm-f32.gguf", "f32", model,
                         tasks=["asr", "QA"])["tasks"] == ["asr", "QA"]
    (model / "salmonn.json").write_text(json.dumps({**d, "tasks": ["asr", "QA"]}))
    nano = load_manifest(model, verify=False)
    assert nano.trained_for("asr") and not nano.trained_for("translation")
    check_trained_for(nano, None)
    with pytest.raises(SalmonnError, match=r"not trained to translate \(it learned: asr, QA\).*--official-ckpt"):
        check_trained_for(nano, "de")
    for bad in ("asr", [""], [3]):
        (model / "salmonn.json").write_text(json.dumps({**d, "tasks": bad}))
        with pytest.raises(ModelError, match="malformed"):
            load_manifest(model, verify=False)


def test_manifest_rejects_newer_format_and_garbage(tmp_path):
    with pytest.raises(ModelError, match="upgrade salmonn"):
        load_manifest(_model_dir(tmp_path / "new", version=FORMAT_VERSION + 1))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "salmonn.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_manifest(tmp_path / "bad")
    with pytest.raises(ModelError, match="not found"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no salmonn.json"):
        load_manifest(tmp_path / "empty")
