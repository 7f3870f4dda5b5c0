"""Issue 18 item 3, "encode once, ask many": `salmonn ask -p Q1 -p Q2 ...` encodes and prefills the
audio once and answers each question from the kept KV cache, token for token what separate asks
give (greedy and beams); `salmonn chat AUDIO` answers questions read from standard input, keeping
the earlier turns in the prompt and in the KV cache."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from salmonn_cli.ask import embed_file
from salmonn_cli.chat import Conversation
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
from salmonn_cli.prompt import TRANSCRIBE_PROMPT, build_prompt, follow_up_token_ids

from conftest import AUDIO, CLI_ENV, OFFICIAL_TINY, default_sigint, salmonn

SPEECH = OFFICIAL_TINY / "speech_2p5s.wav"
SHORT = OFFICIAL_TINY / "short_0p4s.wav"
NARRATION = AUDIO / "narration-moon-landing.mp3"
PROMPT = "Describe the audio."        # the official reference's prompt
PROMPTS = ["What is the speaker saying?", PROMPT, "Is there music?"]
STEPS = 8                             # the reference ran max_new_tokens 8
FAST = ["--threads", "1", "--max-tokens", str(STEPS)]


def run_ok(*args, **kw):
    r = salmonn(*args, *FAST, **kw)
    assert r.returncode == 0, r.stderr
    return r


def with_prompts(prompts):
    return [arg for p in prompts for arg in ("-p", p)]


# --- ask with several prompts --------------------------------------------------------------------

@pytest.mark.parametrize("beams", [1, 4])
def test_several_prompts_equal_separate_asks(model_f32, reference, beams):
    many = json.loads(run_ok("ask", SPEECH, *with_prompts(PROMPTS), "-m", model_f32, "--json",
                             "--beams", str(beams)).stdout)
    assert [a["prompt"] for a in many["answers"]] == PROMPTS
    for prompt, got in zip(PROMPTS, many["answers"]):
        alone = json.loads(run_ok("ask", SPEECH, prompt, "-m", model_f32, "--json", "--beams", str(beams)).stdout)
        assert got["tokens"] == alone["tokens"], prompt
        assert got["text"] == alone["text"] and got["stop_reason"] == alone["stop_reason"]
        assert got["prompt_tokens"] == alone["prompt_tokens"]
    official = reference["speech.beam4_ids" if beams > 1 else "speech.greedy_ids"][0, 1:].tolist()
    assert many["answers"][1]["tokens"] == official        # asked second, from the kept cache
    assert many["beams"] == beams and "encode_s" in many["timings"]
    assert set(many["answers"][0]["timings"]) == {"prefill_s", "decode_s", "decode_tokens_per_s"}


def test_several_prompts_plain_and_jsonl(model_f32):
    plain = run_ok("ask", SPEECH, "-p", PROMPTS[0], "-p", PROMPT, "-m", model_f32).stdout
    alone = [run_ok("ask", SPEECH, p, "-m", model_f32).stdout for p in (PROMPTS[0], PROMPT)]
    assert plain == f"Q: {PROMPTS[0]}\nA: {alone[0]}Q: {PROMPT}\nA: {alone[1]}"
    r = run_ok("ask", SPEECH, SHORT, "-p", PROMPTS[0], "-p", PROMPT, "-m", model_f32, "--jsonl")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["audio"] for row in rows] == [str(SPEECH), str(SHORT)]
    assert all(len(row["answers"]) == 2 and "text" not in row for row in rows)
    # one prompt: the output is what it always was
    one = json.loads(run_ok("ask", SPEECH, "-p", PROMPT, "-m", model_f32, "--json").stdout)
    assert "answers" not in one and "tokens" in one and "encode_s" in one["timings"]


def test_per_chunk_takes_one_prompt(model_f32):
    r = salmonn("ask", SPEECH, "-p", "a", "-p", "b", "--per-chunk", "-m", model_f32)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["salmonn: error: --per-chunk answers one prompt; "
                                                                   "give -p once"]


def test_the_audio_is_prefilled_once(model_f32):
    with Pipeline(str(model_f32), RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=STEPS, beams=4)) as p:
        embeds = embed_file(p, str(SPEECH)).embeds
        p.answer(embeds, PROMPTS[0], reuse_audio=True)
        resets = p.llm.resets
        second = p.answer(embeds, PROMPT, DecodingOptions(max_tokens=STEPS, beams=1), reuse_audio=True)
        assert p.llm.resets == resets                  # no new prefill: the audio stayed in the cache
        fresh = p.answer(embeds, PROMPT, DecodingOptions(max_tokens=STEPS, beams=1))
        assert p.llm.resets == resets + 1 and fresh.tokens == second.tokens
        p.use_lora_scale(0.0)                          # another LoRA scale: the cache is void
        base = p.answer(embeds, PROMPT, DecodingOptions(max_tokens=STEPS, beams=1), reuse_audio=True)
        assert p.llm.resets > resets + 1 and base.tokens != second.tokens


# --- chat ----------------------------------------------------------------------------------------

def chat(model, stdin: str, *extra):
    return salmonn("chat", SPEECH, "-m", model, *FAST, *extra, input=stdin)


def test_chat_first_answer_is_ask_and_follow_ups_work(model_f32):
    alone = run_ok("ask", SPEECH, PROMPT, "-m", model_f32).stdout
    r = chat(model_f32, f"{PROMPT}\n\n   \nWhat did you just say?\nAnd before that?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(alone)                  # no "> " prompt: stdin is not a terminal
    assert r.stdout.count("\n") >= 3 and not r.stderr
    beams = chat(model_f32, f"{PROMPT}\nWhat else?\n", "--beams", "4")
    assert beams.returncode == 0, beams.stderr
    assert beams.stdout.startswith(run_ok("ask", SPEECH, PROMPT, "-m", model_f32, "--beams", "4").stdout)


def test_chat_cuts_a_looping_answer_as_ask_does(model_f32):
    # the tiny model loops on this audio and prompt (tests/test_ask_cli.py)
    args = ("-m", model_f32, "--threads", "1", "--max-tokens", "200", "--repetition-guard")
    alone = salmonn("ask", NARRATION, TRANSCRIBE_PROMPT, *args)
    r = salmonn("chat", NARRATION, *args, input=f"{TRANSCRIBE_PROMPT}\n")
    assert alone.returncode == r.returncode == 0, r.stderr
    free = salmonn("chat", NARRATION, *args[:-1], input=f"{TRANSCRIBE_PROMPT}\n")
    assert r.stdout == alone.stdout and len(free.stdout) > len(r.stdout)


def test_chat_turns_continue_the_cache(model_f32):
    """Turn two is the first turn's prompt and answer, EOS, then BOS and the question in the template;
    decoded from the kept cache it gives what a fresh decode of that whole prompt gives."""
    with Pipeline(str(model_f32), RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=STEPS, beams=1)) as p:
        embeds = embed_file(p, str(SPEECH)).embeds
        talk = Conversation(p, embeds)
        first = talk.ask(PROMPT)
        resets = p.llm.resets
        second = talk.ask("What else?")
        assert p.llm.resets == resets
        llm, prompt = p.llm, build_prompt(p.config, PROMPT, p.llm.tokenize)
        follow_up = follow_up_token_ids(p.config, "What else?", llm.tokenize)
        turn_two = prompt.ids_after + first.tokens + [llm.eos_id, llm.bos_id] + follow_up
        assert talk.history == turn_two + second.tokens + [llm.eos_id]
        fresh = p.answer_ids(embeds, prompt.ids_before, turn_two)
        assert fresh.tokens == second.tokens
        assert second.prompt_tokens == fresh.prompt_tokens == 1 + len(prompt.ids_before) + len(embeds) + len(turn_two)


def test_chat_drops_earlier_turns_when_the_context_is_full(model_f32):
    # prompts of 110, 131 and 154 tokens (8-token answers): with 8 more to answer, the third does not
    # fit in 150 cells, so it is asked about the audio alone
    r = chat(model_f32, f"{PROMPT}\nWhat else?\n{PROMPT}\n", "--context", "150")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["salmonn: notice: the conversation no longer fits in the 150-token context: "
                                     "earlier questions and answers are dropped, the audio stays (--context "
                                     "raises the limit)"]
    alone = run_ok("ask", SPEECH, PROMPT, "-m", model_f32, "--context", "150").stdout
    assert r.stdout.startswith(alone) and r.stdout.endswith(alone) and len(r.stdout) > 2 * len(alone)


def test_chat_ends_at_eof_and_refuses_bad_input(model_f32, tmp_path):
    r = chat(model_f32, "")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = salmonn("chat", "-", "-m", model_f32, input="hello\n")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "salmonn: error: chat reads its questions from standard input: give the audio as a file"]
    r = salmonn("chat", tmp_path / "missing.wav", "-m", model_f32, input="hello\n")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    long_question = "word " * 3000                     # past the context: one line, the chat goes on
    r = chat(model_f32, f"{long_question}\n{PROMPT}\n")
    assert r.returncode == 2 and r.stderr.count("salmonn: error:") == 1 and "context" in r.stderr
    assert r.stdout == run_ok("ask", SPEECH, PROMPT, "-m", model_f32).stdout


def test_chat_ctrl_c_exits_130_in_one_line(model_f32):
    process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "chat", str(SPEECH), "-m", str(model_f32), *FAST],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CLI_ENV, preexec_fn=default_sigint)
    try:
        process.stdin.write(PROMPT + "\n")
        process.stdin.flush()
        assert process.stdout.readline()               # answered; now it waits for the next question
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()] == ["salmonn: interrupted"]
