"""Noticing a client that goes away while its request waits or is answered (the body already read)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


@contextlib.asynccontextmanager
async def watch_disconnect(request, job) -> AsyncIterator[None]:
    """Cancel `job` as soon as the client disconnects, for as long as the block runs."""
    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
