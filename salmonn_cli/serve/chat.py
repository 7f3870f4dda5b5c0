"""POST /v1/chat/completions: OpenAI's chat format answered by the `salmonn ask` flows (`answer_file` or
`answer_each_chunk`), so an answer is token for token what `salmonn ask` prints.

SALMONN answers one question about one recording: the prompt is the text of the last user message,
the audio its `input_audio` part (or, in a conversation that goes on about the same recording, the
latest earlier user message's). Earlier turns, system messages and the assistant's replies are not
part of the prompt: the model was trained on single questions.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import anyio
from starlette.responses import JSONResponse, StreamingResponse

from salmonn_cli.ask import answer_each_chunk, answer_file, chunk_label
from salmonn_cli.audio_input import MemoryAudio, open_audio
from salmonn_cli.beams import MAX_BEAMS
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import SalmonnError
from salmonn_cli.prompt import check_instruction
from salmonn_cli.serve.body import read_json
from salmonn_cli.serve.disconnect import watch_disconnect
from salmonn_cli.serve.errors import APIError, bad_request
from salmonn_cli.serve.params import flag, number, request_decoding
from salmonn_cli.serve.worker import CancellableGuard, model_result

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
FINISH_REASONS = {"eos": "stop", "max_tokens": "length", "context_full": "length"}
MAX_TEMPERATURE = 2.0          # OpenAI's range
MAX_SEED = 2 ** 63 - 1         # numpy's generator takes non-negative seeds


@dataclass
class ChatRequest:
    prompt: str
    audio: bytes
    audio_param: str                     # where the audio came from, for error messages
    decoding: DecodingOptions
    lora_scale: float | None
    per_chunk: bool = False
    truncate: bool = False
    stream: bool = False
    include_usage: bool = False
    repetition_guard: bool | None = None  # None: the model's own (its manifest), as `salmonn ask`


@dataclass
class ChatResult:
    text: str
    tokens: list[int]
    stop_reason: str
    prompt_tokens: int
    audio_tokens: int
    details: dict = field(default_factory=dict)     # salmonn's own facts, as `ask --json` gives them

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.stop_reason, "stop")

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"audio_tokens": self.audio_tokens, "cached_tokens": 0}}


# --- the request -----------------------------------------------------------------------------------

def content_parts(message: dict, index: int) -> tuple[list[str], list[tuple[str, dict]]]:
    """(text pieces, [(param, input_audio object)]) of one message."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param=param)
    texts, audio = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.text must be a string", param=f"{where}.text")
            texts.append(part["text"])
        elif kind == "input_audio":
            if not isinstance(part.get("input_audio"), dict):
                raise bad_request(f"{where}.input_audio must be an object with data and format",
                                  param=f"{where}.input_audio")
            audio.append((f"{where}.input_audio", part["input_audio"]))
        else:
            raise bad_request(f"{where}: content parts of type {kind!r} are not supported "
                              "(use \"text\" and \"input_audio\")", param=where)
    return texts, audio


def audio_bytes(param: str, part: dict) -> bytes:
    fmt = part.get("format")
    if fmt not in AUDIO_FORMATS:
        raise bad_request(f"{param}.format must be one of {', '.join(AUDIO_FORMATS)}, not {fmt!r}",
                          param=f"{param}.format", code="invalid_audio_format")
    data = part.get("data")
    if not isinstance(data, str):
        raise bad_request(f"{param}.data must be a base64 string", param=f"{param}.data")
    if data.startswith("data:") and "," in data:       # a data: URL, as some clients send
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}.data is not valid base64", param=f"{param}.data",
                          code="invalid_base64") from None
    if not raw:
        raise bad_request(f"{param}.data is empty", param=f"{param}.data")
    return raw


def find_audio(messages: list, user: list[int], last_parts) -> tuple[str, dict]:
    for i in reversed(user):
        parts = last_parts if i == user[-1] else content_parts(messages[i], i)[1]
        if len(parts) > 1:
            raise bad_request(f"messages[{i}] has {len(parts)} input_audio parts; send one recording per message",
                              param=f"messages[{i}].content")
        if parts:
            return parts[0]
    raise bad_request("no input_audio part in the user messages: SALMONN answers questions about a recording",
                      param="messages")


def parse_chat(body: dict, served: DecodingOptions) -> ChatRequest:
    """Check the request body; `served` is the server's decoding (see `request_decoding`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
    user = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user:
        raise bad_request("there is no user message to answer", param="messages")
    texts, parts = content_parts(messages[user[-1]], user[-1])
    prompt = "\n".join(t for t in texts if t.strip())
    try:
        check_instruction(prompt)
    except SalmonnError:
        raise bad_request(f"messages[{user[-1]}] has no text: ask a question about the audio",
                          param=f"messages[{user[-1]}].content") from None
    param, part = find_audio(messages, user, parts)
    audio = audio_bytes(param, part)

    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad_request("n must be 1", param="n")
    if body.get("stop") not in (None, [], ""):
        raise bad_request("stop sequences are not supported", param="stop")
    limit = number(body, "max_completion_tokens", None, 1, float("inf"), integer=True)
    if limit is None:
        limit = number(body, "max_tokens", None, 1, float("inf"), integer=True)
    decoding = request_decoding(served, limit, temperature=number(body, "temperature", 0.0, 0.0, MAX_TEMPERATURE),
                                top_p=number(body, "top_p", 1.0, 0.0, 1.0),
                                seed=number(body, "seed", None, 0, MAX_SEED, integer=True),
                                beams=number(body, "beams", None, 1, MAX_BEAMS, integer=True))
    lora_scale = number(body, "lora_scale", None, -1e6, 1e6)
    per_chunk = flag(body, "per_chunk") or flag(body, "per_window")      # per_window: its old name
    truncate = flag(body, "truncate")
    if per_chunk and truncate:
        raise bad_request("per_chunk and truncate do not go together", param="per_chunk")
    stream = flag(body, "stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    repetition_guard = flag(body, "repetition_guard", None)
    return ChatRequest(prompt, audio, param, decoding, lora_scale, per_chunk, truncate, stream, include_usage,
                       repetition_guard)


# --- the answer (in the model's thread) ------------------------------------------------------------

def answer_chat(pipeline, job, request: ChatRequest, on_ready: Callable[[], None],
                on_text: Callable[[str], None] | None = None) -> ChatResult:
    """As `salmonn ask` answers one file. `on_ready` is called once the audio has been read (until
    then a bad recording can still be a 400); `on_text` gets the answer as it is generated."""
    audio_in = open_audio(MemoryAudio(request.audio, "input_audio"))
    emit = on_text or (lambda text: None)
    stop = CancellableGuard(job) if pipeline.uses_repetition_guard(request.repetition_guard) else job.stop
    if request.per_chunk:
        return per_chunk_answer(pipeline, job, request, audio_in, on_ready, emit, stop)

    def on_audio(audio) -> None:
        on_ready()
        job.check()

    result = answer_file(pipeline, audio_in, request.prompt, truncate=request.truncate, decoding=request.decoding,
                         on_audio=on_audio, on_text=emit, stop=stop)
    answer = result.answer
    return ChatResult(answer.text, answer.tokens, answer.stop_reason, answer.prompt_tokens, len(result.audio.embeds),
                      result.to_dict())


def per_chunk_answer(pipeline, job, request, audio_in, on_ready, emit, stop) -> ChatResult:
    """One answer per chunk, each line led by its times, as `salmonn ask --per-chunk` prints them."""

    def on_chunk(chunk) -> None:
        if not chunk.index:
            on_ready()
        job.check()
        emit(("\n" if chunk.index else "") + chunk_label(chunk))

    result = answer_each_chunk(pipeline, audio_in, request.prompt, decoding=request.decoding,
                               on_chunk=on_chunk, on_text=emit, stop=stop)
    answers = [c.answer for c in result.chunks]
    return ChatResult("\n".join(chunk_label(c) + c.answer.text for c in result.chunks),
                      [t for a in answers for t in a.tokens], answers[-1].stop_reason if answers else "eos",
                      sum(a.prompt_tokens for a in answers), sum(c.audio_tokens for c in result.chunks),
                      {**result.to_dict(), "beams": request.decoding.beams})


# --- the response ----------------------------------------------------------------------------------

def completion(result: ChatResult, model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": result.usage(), "salmonn": result.details}


class ChunkStream:
    """Server-sent events in OpenAI's chunk format: the role, the text as it comes, the finish reason
    (with salmonn's facts), the usage when asked for, then [DONE]."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return event(body)

    def usage(self, result: ChatResult) -> bytes:
        return event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                      "model": self.model, "choices": [], "usage": result.usage()})


def event(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


# --- the route -------------------------------------------------------------------------------------

READY = object()
END = object()


async def chat_completions(request, server) -> object:
    """The route's body: `server` is the app's `ServerState`."""
    with server.worker.admit() as job:
        body = await read_json(request, server.upload_limit)
        chat = parse_chat(body, server.decoding)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work(pipeline, job):
            pipeline.use_lora_scale(server.lora_scale if chat.lora_scale is None else chat.lora_scale)
            return answer_chat(pipeline, job, chat, on_ready=lambda: put(READY),
                               on_text=put if chat.stream else None)

        async with watch_disconnect(request, job):
            task = asyncio.ensure_future(server.worker.run(job, work))
            task.add_done_callback(lambda _: events.put_nowait(END))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())    # retrieved, when no one awaits it
            if not chat.stream:
                result = await model_result(task, chat.audio_param)
                server.note(request, f"{result.prompt_tokens}+{len(result.tokens)} tokens")
                return JSONResponse(completion(result, server.model_id))
            # the first event says whether the audio could be read: a bad recording is still a 400
            first = await events.get()
            if first is END:
                await model_result(task, chat.audio_param)      # raises what went wrong
                raise bad_request("the audio holds no samples", param=chat.audio_param)
    stream = ChunkStream(server.model_id)

    async def chunks():
        completed = False
        try:
            yield stream.chunk({"role": "assistant", "content": ""})
            while (item := await events.get()) is not END:
                if isinstance(item, str):
                    yield stream.chunk({"content": item})
            try:
                result = await model_result(task, chat.audio_param)
            except APIError as e:                 # after the headers: the error goes in the stream
                server.note(request, e.message)
                yield event(e.body())
                return
            yield stream.chunk({}, result.finish_reason, salmonn=result.details)
            if chat.include_usage:
                yield stream.usage(result)
            yield DONE
            completed = True
            server.note(request, f"{result.prompt_tokens}+{len(result.tokens)} tokens, streamed")
        finally:
            if not completed:
                job.cancel()
                # the log line says where the model stopped: wait (a token at most) for it to stop
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([task])
                server.note(request, f"client went away; stopped after {job.tokens} tokens")

    # (the request's place in the queue stays taken until the model has stopped working for it)
    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
