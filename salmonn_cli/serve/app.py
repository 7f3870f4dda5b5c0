"""The routes, the API key, and one log line per request. Every error is answered in OpenAI's
shape and logged as one line; only SALMONN_DEBUG=1 shows a traceback."""
from __future__ import annotations

import hmac
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import DEBUG_ENV
from salmonn_cli.serve.audio_api import audio_route
from salmonn_cli.serve.chat import chat_completions
from salmonn_cli.serve.errors import APIError
from salmonn_cli.serve.worker import ModelWorker

PAGE_DIR = Path(__file__).with_name("page")
NOTE_KEY = "salmonn.note"            # what the request's log line says after its status


@dataclass
class ServerState:
    worker: ModelWorker
    model_id: str
    created: int                     # the model's manifest time, for /v1/models
    upload_limit: int                # bytes
    decoding: DecodingOptions        # for requests that name none; its max_tokens and beams are the most
    lora_scale: float | None         # for requests that name none (None: as exported)
    api_key: str | None
    log: Callable[[str], None]

    def note(self, request: Request, text: str) -> None:
        request.scope[NOTE_KEY] = text


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is needed: send the header Authorization: Bearer KEY "
                       "(the key salmonn serve was started with)", code="invalid_api_key")


def endpoint(state: ServerState, handler: Callable[[Request, ServerState], Awaitable[Response]],
             *, needs_key: bool = True):
    """A route that checks the key, and turns every failure into one OpenAI-shaped error."""
    async def route(request: Request) -> Response:
        try:
            if needs_key and state.api_key is not None:
                check_key(request, state.api_key)
            return await handler(request, state)
        except APIError as e:
            state.note(request, e.message)
            return error_response(e)
        except ClientDisconnect:
            state.note(request, "client went away while sending")
            return Response(status_code=499)
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            state.note(request, f"internal error: {type(e).__name__}: {first}")
            return error_response(APIError(500, f"internal error: {type(e).__name__}: {first}",
                                           type="server_error"))
    return route


# --- routes ----------------------------------------------------------------------------------------

async def page(request: Request, state: ServerState) -> Response:
    return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"))


async def page_script(request: Request, state: ServerState) -> Response:
    return Response((PAGE_DIR / "page.js").read_text(encoding="utf-8"), media_type="text/javascript")


async def health(request: Request, state: ServerState) -> Response:
    return JSONResponse({"status": "ok", "model": state.model_id, "queue": state.worker.state()})


def model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "salmonn"}


async def models(request: Request, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(state)]})


async def model(request: Request, state: ServerState) -> Response:
    if request.path_params["model"] != state.model_id:
        raise APIError(404, f"no model {request.path_params['model']!r}: this server has {state.model_id!r}",
                       param="model", code="model_not_found")
    return JSONResponse(model_card(state))


async def chat(request: Request, state: ServerState) -> Response:
    return await chat_completions(request, state)


async def transcriptions(request: Request, state: ServerState) -> Response:
    return await audio_route(request, state, translation=False)


async def translations(request: Request, state: ServerState) -> Response:
    return await audio_route(request, state, translation=True)


async def not_found(request: Request, exc: HTTPException) -> Response:
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="not_found" if exc.status_code == 404 else None)
    request.scope[NOTE_KEY] = error.message
    return error_response(error)


# --- the app ---------------------------------------------------------------------------------------

class RequestLog:
    """ASGI middleware: one line per request, with its status, time and what the route noted."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app = app
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = None

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            note = scope.get(NOTE_KEY)
            self.log(f"{client[0] if client else '-'} \"{scope['method']} {scope['path']}\" {status or '-'} "
                     f"{time.monotonic() - started:.2f} s" + (f": {note}" if note else ""))


def create_app(state: ServerState, lifespan=None) -> RequestLog:
    def open_route(path: str, handler, methods=("GET",)) -> Route:
        return Route(path, endpoint(state, handler, needs_key=False), methods=list(methods))

    def api_route(path: str, handler, methods=("GET",)) -> Route:
        return Route(path, endpoint(state, handler), methods=list(methods))

    routes = [
        open_route("/", page),
        open_route("/page.js", page_script),
        open_route("/health", health),
        api_route("/v1/models", models),
        api_route("/v1/models/{model:path}", model),
        api_route("/v1/chat/completions", chat, methods=("POST",)),
        api_route("/v1/audio/transcriptions", transcriptions, methods=("POST",)),
        api_route("/v1/audio/translations", translations, methods=("POST",)),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    return RequestLog(app, state.log)
