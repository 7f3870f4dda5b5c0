"""Request bodies, held in memory and never past the upload limit.

A body whose Content-Length is over the limit is refused before any of it is read; a body without
one (chunked) is counted as it arrives and refused as soon as it passes the limit. Multipart uploads
stay in memory (the parser's spool is as large as the limit), so nothing a client sends reaches the
disk.
"""
from __future__ import annotations

import json
from typing import AsyncIterator

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from salmonn_cli.serve.errors import APIError, bad_request

MIB = 1024 * 1024
FORM_FIELDS_MAX = 32        # a transcription request has a handful


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's upload limit of {limit / MIB:g} MB "
                    "(salmonn serve --max-upload-mb)", code="request_too_large")


async def bounded_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request("the Content-Length header is not a number") from None
        if size > limit:
            raise too_large(limit)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        yield chunk


async def read_json(request: Request, limit: int) -> dict:
    data = b"".join([chunk async for chunk in bounded_stream(request, limit)])
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:   # ValueError: bad UTF-8 or JSON
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


class InMemoryMultiPartParser(MultiPartParser):
    def __init__(self, request: Request, limit: int, stream: AsyncIterator[bytes]):
        super().__init__(request.headers, stream, max_files=1, max_fields=FORM_FIELDS_MAX)
        self.spool_max_size = limit     # the whole body is at most this: the spool never goes to disk


async def read_form(request: Request, limit: int) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """(text fields, {field: (file name, bytes)}) of a multipart/form-data body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data with a `file` field")
    try:
        form = await InMemoryMultiPartParser(request, limit, bounded_stream(request, limit)).parse()
    except MultiPartException as e:
        raise bad_request(f"the multipart body cannot be read: {e.message}") from None
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                files[name] = (value.filename or name, await value.read())
    finally:
        await form.close()
    return fields, files
