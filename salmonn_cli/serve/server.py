"""Run the server: the socket is bound before the model loads (a taken port fails at once), the model
answers requests in its own thread, and SIGTERM or Ctrl-C drains: no new connections, the requests
already in answered, then exit code 0."""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import python_multipart  # noqa: F401  (starlette would otherwise fail only at the first upload)
import uvicorn

from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import SalmonnError
from salmonn_cli.serve.app import ServerState, create_app
from salmonn_cli.serve.body import MIB
from salmonn_cli.serve.worker import ModelWorker

LOG_PREFIX = "salmonn serve: "
BACKLOG = 128


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_upload_mb: float = 100.0
    queue: int = 16
    decoding: DecodingOptions = DecodingOptions()    # beams None: the model's own
    lora_scale: float | None = None


def log_line(message: str) -> None:
    print(LOG_PREFIX + message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SalmonnError(f"cannot listen on {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)         # clients that connect while the model loads wait in the backlog
    except OSError as e:
        sock.close()
        raise SalmonnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OneLineFormatter(logging.Formatter):
    """uvicorn's own warnings (a malformed request line, ...) as one line each, without tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        return LOG_PREFIX + record.getMessage().replace("\n", "\\n")


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM and Ctrl-C ending in exit code 0 after the drain (uvicorn raises the
    signal again once it has stopped, which would end the process with the signal's status)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self.on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log_line("stopping: answering the requests already in, then exiting")
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_started()


def serve(model: str | None, runtime, options: ServeOptions, notice: Callable[[str], None],
          on_loaded: Callable[[object], None] = lambda pipeline: None) -> int:
    from salmonn_cli.default_model import resolve_model_dir
    from salmonn_cli.pipeline import Pipeline

    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    try:
        pipeline = Pipeline(resolve_model_dir(model), runtime, options.decoding)
    except BaseException:
        sock.close()
        raise
    worker = ModelWorker(pipeline, options.queue)
    try:
        on_loaded(pipeline)
        pipeline.use_lora_scale(options.lora_scale)        # a model without the adapter fails here, not per request
        manifest = pipeline.manifest
        state = ServerState(
            worker=worker, model_id=manifest.model_dir.name, created=int(manifest.model_dir.stat().st_mtime),
            upload_limit=int(options.max_upload_mb * MIB), decoding=pipeline.decoding, lora_scale=options.lora_scale,
            api_key=options.api_key, log=log_line)
    except BaseException:
        worker.close()
        sock.close()
        raise
    if not is_loopback(host) and options.api_key is None:
        notice(f"listening on {host} without --api-key: anyone who can reach this machine can use the model")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()          # after the drain: the last request has been answered

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    config = uvicorn.Config(create_app(state, lifespan=lifespan), log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None, server_header=False)
    server = DrainingServer(config, on_started=lambda: log_line(
        f"{state.model_id} listening on http://{shown}:{port} (the page is at /, the API at /v1; Ctrl-C stops)"))
    server.run(sockets=[sock])
    return 0
