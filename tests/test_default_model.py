"""salmonn-nano as the default model: a checkpoint packaged into the few MB that ship in
salmonn_cli/nano/, built on first use into the user's cache by our own export, and
`salmonn ask` without --model answering with it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from salmonn_cli.default_model import (BUILT_FROM_FILE, NANO_DATA_DIR, WEIGHTS_FILE, default_model_dir,
                                       shipped_digest)
from salmonn_cli.errors import ModelError
from salmonn_cli.manifest import sha256_of

from conftest import default_sigint
from test_nano_recipe import needs_base_models
from test_reliability import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
SPOKEN_CLIP = Path("/usr/share/sounds/alsa/Front_Center.wav")     # alsa-utils: "front center"
BUILD_NOTICE = "building the default model salmonn-nano"


def test_missing_training_extras_is_one_clear_error(tmp_path, monkeypatch):
    data = tmp_path / "nano"
    data.mkdir()
    (data / WEIGHTS_FILE).write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "torch", None)                # as if the training extras were not installed
    with pytest.raises(ModelError, match=r"needs the training extras .*pass --model DIR"):
        default_model_dir(data, tmp_path / "cache" / "nano")
    assert not (tmp_path / "cache" / "nano").exists()


def test_an_installation_without_weights_asks_for_a_model(tmp_path):
    with pytest.raises(ModelError, match="ships no salmonn-nano weights"):
        default_model_dir(tmp_path / "empty", tmp_path / "cache" / "nano")


def file_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_of(p) for p in sorted(model_dir.iterdir())}


def answer(stdout: str) -> dict:
    result = json.loads(stdout)
    return {"text": result["text"], "tokens": result["tokens"]}


def ask_default(env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "salmonn_cli", "ask", str(SPOKEN_CLIP), "What does the speaker say?",
                             "--json", "--temperature", "0", "--max-tokens", "12", "--threads", "1", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_base_models
@pytest.mark.skipif(not SPOKEN_CLIP.is_file(), reason="needs alsa-utils' sample sounds")
def test_ask_without_model_builds_nano_once_into_the_cache(tmp_path):
    assert (NANO_DATA_DIR / WEIGHTS_FILE).is_file(), "the repository must ship salmonn-nano's weights"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("SALMONN_MODEL", None)
    # two first runs at once: one builds, the other waits for it; both answer the same
    first, second = ask_default(env), ask_default(env)
    results = [(p.wait(timeout=900), *p.communicate()) for p in (first, second)]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    answers = [answer(out) for _, out, _ in results]
    assert answers[0] == answers[1] and answers[0]["tokens"]
    assert sum(BUILD_NOTICE in err for _, _, err in results) == 1
    model_dir = tmp_path / "cache" / "salmonn" / "nano"
    assert (model_dir / BUILT_FROM_FILE).read_text().strip() == shipped_digest()
    # only the model is left (the lock and the verification record are salmonn's own small files),
    # not the 517 MB SmolLM2 folder the build goes through
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [".nano.lock", "nano", "verified.json"]
    # stderr is a pipe here: no progress-bar frames, and the real build time at the end
    build_log = next(err for _, _, err in results if BUILD_NOTICE in err)
    assert "\r" not in build_log and "it/s" not in build_log, build_log[-2000:]
    assert re.search(r"^salmonn: salmonn-nano built in \d+ s$", build_log, re.MULTILINE), build_log[-2000:]
    # a second build gives the same bytes
    again = default_model_dir(NANO_DATA_DIR, tmp_path / "again" / "nano")
    assert file_digests(again) == file_digests(model_dir)
    # later runs use the built model as it is
    third = ask_default(env)
    code, out, err = third.wait(timeout=300), *third.communicate()
    assert code == 0 and BUILD_NOTICE not in err and answer(out) == answers[0]
    # the manifest names what nano learned; a task it never learned is refused in one line, not answered
    assert json.loads((model_dir / "salmonn.json").read_text())["tasks"] == ["QA", "asr", "audiocaption"]
    refused = subprocess.run([sys.executable, "-m", "salmonn_cli", "transcribe", str(SPOKEN_CLIP), str(SPOKEN_CLIP),
                              "--translate", "de", "--threads", "1"],
                             cwd=REPO, env=env, capture_output=True, timeout=300)
    assert_one_line_error(refused, "not trained to translate", "--official-ckpt")
    assert refused.stdout == b""


CHILD_THAT_REPORTS_CTRL_C = """
import sys, time
try:
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("salmonn: interrupted", file=sys.stderr)
    sys.exit(130)
"""


def test_ctrl_c_during_the_build_is_reported_once(tmp_path):
    """Ctrl-C reaches the whole process group: the build (a child program of our own) says
    "interrupted" and exits 130; the CLI passes the code on without a second line."""
    (tmp_path / "reporting_child.py").write_text(CHILD_THAT_REPORTS_CTRL_C)
    parent = ("import sys\n"
              "from salmonn_cli.cli import run\n"
              "import typer\n"
              "app = typer.Typer()\n"
              "@app.command()\n"
              "def build():\n"
              "    from salmonn_cli.training_side import run_module\n"
              "    run_module('reporting_child', [], 'the build')\n"
              "sys.exit(run(app))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-c", parent], stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=default_sigint)
    assert proc.stderr.readline().strip() == "ready"     # the child's stdout goes to our stderr
    os.killpg(proc.pid, signal.SIGINT)                    # as a terminal's Ctrl-C does
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert rest.count("interrupted") == 1, rest
