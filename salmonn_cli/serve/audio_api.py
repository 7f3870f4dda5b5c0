"""POST /v1/audio/transcriptions and /v1/audio/translations, answered by `salmonn transcribe`'s flow
(`transcribe_file`: chunks of at most 30 s cut at quiet seams, the official task prompts) and written
by its own writers, so every format is byte for byte what `salmonn transcribe` prints.

`language` means what OpenAI means on transcriptions (the language spoken, a hint: SALMONN's
recognition prompt names none, so it is only checked and reported). On translations OpenAI always
translates into English; salmonn translates into any language, so there `language` is the target,
English when it is not given.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

from salmonn_cli.audio_input import MemoryAudio
from salmonn_cli.beams import MAX_BEAMS
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import SalmonnError
from salmonn_cli.serve.body import read_form
from salmonn_cli.serve.chat import MAX_TEMPERATURE
from salmonn_cli.serve.disconnect import watch_disconnect
from salmonn_cli.serve.errors import bad_request, from_salmonn_error
from salmonn_cli.serve.params import form_number, request_decoding
from salmonn_cli.serve.worker import CancellableGuard, model_result
from salmonn_cli.subtitles import WRITERS
from salmonn_cli.transcribe import (TranscribeOptions, Transcript, check_trained_for, language_name,
                                   transcribe_file)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TEXT_WRITERS = {"text": "txt", "srt": "srt", "vtt": "vtt"}
DEFAULT_TRANSLATION_TARGET = "en"        # OpenAI's translations are into English


@dataclass
class AudioRequest:
    audio: bytes
    name: str
    translate: str | None            # target language (code or name) for translations
    language: str | None             # the spoken language a transcription request names
    response_format: str
    decoding: DecodingOptions
    lora_scale: float | None


def parse_audio_request(fields: dict[str, str], files: dict[str, tuple[str, bytes]], *, translation: bool,
                        served: DecodingOptions) -> AudioRequest:
    if "file" not in files:
        raise bad_request("the audio goes in a multipart field named `file`", param="file")
    name, audio = files["file"]
    if not audio:
        raise bad_request("the uploaded file is empty", param="file")
    fmt = fields.get("response_format", "json").strip() or "json"
    if fmt not in RESPONSE_FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
                          param="response_format")
    language = fields.get("language", "").strip() or None
    try:
        if language is not None:
            language_name(language)
    except SalmonnError as e:
        raise from_salmonn_error(e, param="language") from None
    decoding = request_decoding(served, form_number(fields, "max_tokens", None, 1, float("inf"), integer=True),
                                temperature=form_number(fields, "temperature", 0.0, 0.0, MAX_TEMPERATURE),
                                beams=form_number(fields, "beams", None, 1, MAX_BEAMS, integer=True))
    lora_scale = form_number(fields, "lora_scale", None, -1e6, 1e6)
    translate = (language or DEFAULT_TRANSLATION_TARGET) if translation else None
    return AudioRequest(audio, name, translate, None if translation else language, fmt, decoding, lora_scale)


def transcribe_upload(pipeline, job, request: AudioRequest) -> Transcript:
    """As `salmonn transcribe` (its default repetition guard, silent chunks skipped)."""
    options = TranscribeOptions(translate=request.translate, decoding=request.decoding,
                                repetition_guard=CancellableGuard(job))
    return transcribe_file(pipeline, MemoryAudio(request.audio, request.name), options,
                           on_segment=lambda segment: job.check(), progress=False)


def written(transcript: Transcript, writer: str) -> str:
    out = io.StringIO()
    WRITERS[writer](transcript.segments, out, transcript.metadata())
    return out.getvalue()


def render(transcript: Transcript, request: AudioRequest) -> tuple[str, object]:
    """(media type, body): text for text/srt/vtt, a dict for json/verbose_json."""
    fmt = request.response_format
    if fmt in TEXT_WRITERS:
        return "text/plain; charset=utf-8", written(transcript, TEXT_WRITERS[fmt])
    if fmt == "json":
        return "application/json", {"text": transcript.text}
    language = transcript.language or (language_name(request.language) if request.language else None)
    return "application/json", {
        "task": transcript.task, "language": language, "duration": round(transcript.seconds, 3),
        "text": transcript.text,
        "segments": [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
                      "text": s.text, "tokens": s.tokens, "temperature": request.decoding.temperature}
                     for i, s in enumerate(transcript.segments)],
    }


async def audio_route(request, server, *, translation: bool):
    with server.worker.admit() as job:
        fields, files = await read_form(request, server.upload_limit)
        upload = parse_audio_request(fields, files, translation=translation, served=server.decoding)
        try:
            check_trained_for(server.worker.pipeline.manifest, upload.translate)   # before it waits in the queue
        except SalmonnError as e:
            raise from_salmonn_error(e, param="language" if translation else None) from None

        def work(pipeline, job):
            pipeline.use_lora_scale(server.lora_scale if upload.lora_scale is None else upload.lora_scale)
            return transcribe_upload(pipeline, job, upload)

        async with watch_disconnect(request, job):
            transcript = await model_result(server.worker.run(job, work), "file")
    server.note(request, f"{transcript.seconds:.1f} s of audio, {len(transcript.segments)} segments")
    media_type, body = render(transcript, upload)
    if isinstance(body, str):
        return Response(body, media_type=media_type)
    return JSONResponse(body)
