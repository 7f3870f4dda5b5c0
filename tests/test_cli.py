"""End to end through the real command line: `salmonn export` of the official-tiny fixture, then
`salmonn ask` against the official reference tokens, the torch-free runtime, and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import CLI_ENV as ENV, OFFICIAL_TINY, REFERENCE_INPUTS, salmonn

PROMPT = "Describe the audio."


def ask_json(model, wav, *extra):
    r = salmonn("ask", wav, PROMPT, "--model", model, "--json", "--temperature", "0",
                "--max-tokens", "8", "--threads", "1", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --- the official answer ------------------------------------------------------------------------

def test_export_writes_a_complete_model_directory(model_f32):
    manifest = json.loads((model_f32 / "salmonn.json").read_text())
    assert manifest["quant"] == "f32"
    assert set(manifest["files"]) == {"audio_encoder.onnx", "llm-f32.gguf", "lora-adapter.gguf"}
    assert manifest["lora_adapter"] == "lora-adapter.gguf"
    assert manifest["config"]["llm"]["hidden_size"] == 64
    assert not any(p.name.startswith(".") for p in model_f32.parent.iterdir())


@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_ask_f32_returns_the_official_greedy_tokens(model_f32, reference, name):
    # --truncate: the official model hears only the first 30 s of `long` (40 s)
    out = ask_json(model_f32, OFFICIAL_TINY / REFERENCE_INPUTS[name], "--truncate")
    assert out["tokens"] == reference[f"{name}.greedy_ids"][0, 1:].tolist()  # exact
    assert out["truncated"] == (name == "long")
    assert out["stop_reason"] == "max_tokens"
    assert out["text"]


def test_ask_q8_0_gives_the_same_first_token(model_q8, reference):
    for name, wav in REFERENCE_INPUTS.items():
        out = ask_json(model_q8, OFFICIAL_TINY / wav, "--truncate")
        assert out["tokens"][0] == reference[f"{name}.greedy_ids"][0, 1]


def test_ask_streams_text_and_reads_model_from_env(model_f32):
    r = salmonn("ask", OFFICIAL_TINY / "long_40s.wav", PROMPT, "--max-tokens", "4", "--threads", "1",
                "--truncate", env={"SALMONN_MODEL": str(model_f32)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "only the first 30.0 s are used" in r.stderr


@pytest.mark.parametrize("command", [
    ["ask", "WAV", "Hi", "--max-tokens", "2"],
    ["transcribe", "WAV", "--max-tokens", "2", "--format", "srt"],
    ["listen", "--input", "WAV", "--speed", "0", "--max-tokens", "2"],
])
def test_runtime_never_imports_torch(model_f32, command):
    argv = [str(OFFICIAL_TINY / "speech_2p5s.wav") if a == "WAV" else a for a in command]
    code = (
        "import sys\n"
        "from salmonn_cli.cli import main\n"
        f"sys.argv = ['salmonn', *{argv!r}, '--model', {str(model_f32)!r}, '--threads', '1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "print('HEAVY', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


# --- bad input: one line on stderr, non-zero exit -----------------------------------------------

def test_missing_audio_file(model_f32, tmp_path):
    line = one_line_error(salmonn("ask", tmp_path / "nope.wav", PROMPT, "--model", model_f32))
    assert "nope.wav" in line


def test_text_file_renamed_wav(model_f32, tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio\n" * 20)
    line = one_line_error(salmonn("ask", fake, PROMPT, "--model", model_f32))
    assert "notes.wav" in line


def test_zero_length_audio(model_f32, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.int16), 16000)
    line = one_line_error(salmonn("ask", empty, PROMPT, "--model", model_f32))
    assert "empty.wav" in line


def test_missing_model_directory(tmp_path):
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", PROMPT, "--model", tmp_path / "none"))
    assert "not found" in line


def test_model_directory_missing_a_file(model_f32, tmp_path):
    broken = shutil.copytree(model_f32, tmp_path / "m")
    (broken / "audio_encoder.onnx").unlink()
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", PROMPT, "--model", broken))
    assert "audio_encoder.onnx" in line


def test_model_file_with_wrong_sha256(model_f32, tmp_path):
    broken = shutil.copytree(model_f32, tmp_path / "m")
    gguf = broken / "llm-f32.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", PROMPT, "--model", broken,
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    assert "sha256" in line


def test_truncated_gguf(model_f32, tmp_path):
    broken = shutil.copytree(model_f32, tmp_path / "m")
    gguf = broken / "llm-f32.gguf"
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    line = one_line_error(salmonn("ask", OFFICIAL_TINY / "speech_2p5s.wav", PROMPT, "--model", broken))
    assert "truncated" in line


def test_export_refuses_to_overwrite_and_leaves_nothing_on_failure(model_f32, tmp_path):
    line = one_line_error(salmonn("export", "--checkpoint", OFFICIAL_TINY / "salmonn_tiny.pth",
                                  "--out", model_f32, "--quant", "f32"))
    assert "already exists" in line
    out = tmp_path / "never"
    line = one_line_error(salmonn("export", "--official-ckpt", OFFICIAL_TINY / "salmonn_tiny.pth",
                                  "--whisper", OFFICIAL_TINY / "whisper", "--beats", OFFICIAL_TINY / "beats.pt",
                                  "--llm", tmp_path, "--quant", "f32", "--out", out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
