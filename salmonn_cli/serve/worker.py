"""The loaded model answers one request at a time, in its own thread; requests wait in a bounded queue.

`admit()` takes a place when a request arrives, before its body is read, so a full queue turns
requests away (503 with Retry-After) without taking their uploads. A request whose client has gone
is cancelled: a waiting one is skipped, a running one stops at its next token (`Job.check`, called
from the decoding loop's stop check).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterator

from salmonn_cli.decoding import RepetitionGuard
from salmonn_cli.errors import AudioError, SalmonnError
from salmonn_cli.serve.errors import APIError, from_salmonn_error

# weight of the newest request in the running mean of request durations (for Retry-After)
DURATION_SMOOTHING = 0.3


class ClientGone(Exception):
    """The client disconnected: its generation stops."""



async def model_result(work: Awaitable, audio_param: str) -> Any:
    """What a job on the model returned; its failure as the API error to answer with (`audio_param`:
    the request field an unreadable recording came in)."""
    try:
        return await work
    except SalmonnError as e:
        raise from_salmonn_error(e, param=audio_param if isinstance(e, AudioError) else None) from None
    except ClientGone:
        raise APIError(499, "the client went away", code="client_closed") from None

class Job:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.future: asyncio.Future | None = None
        self.tokens = 0                     # generated so far (for the log line of a cancelled job)

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise ClientGone()

    def stop(self, tokens: list[int]) -> None:
        """A `stop` check for `Pipeline.answer`: never stops it, but raises once the client is gone."""
        self.tokens = len(tokens)
        self.check()


class CancellableGuard(RepetitionGuard):
    """The repetition guard of a transcription or a chat answer, which also stops when the client has gone."""

    def __init__(self, job: Job):
        super().__init__()
        self.job = job

    def __call__(self, tokens: list[int]) -> str | None:
        self.job.stop(tokens)
        return super().__call__(tokens)


class ModelWorker:
    def __init__(self, pipeline, queue: int):
        self.pipeline = pipeline
        self.queue = queue                  # requests that may wait while one is answered
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="salmonn-model")
        self._admitted = 0                  # touched only in the event loop's thread
        self._running = False
        self._mean_seconds = 1.0

    def state(self) -> dict:
        return {"busy": self._running, "waiting": max(0, self._admitted - int(self._running)),
                "capacity": self.queue}

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (self._admitted - self.queue)))

    @contextlib.contextmanager
    def admit(self) -> Iterator[Job]:
        if self._admitted > self.queue:
            raise APIError(503, f"the server is busy: {self.queue} requests are waiting; try again later",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        self._admitted += 1
        job = Job()
        try:
            yield job
        except BaseException:
            job.cancel()
            raise
        finally:
            if job.future is not None and not job.future.done():
                # the model is still on it (it stops at its next token): its place is freed after
                job.future.add_done_callback(lambda _: self._release())
            else:
                self._release()

    def _release(self) -> None:
        self._admitted -= 1

    async def run(self, job: Job, work: Callable[[Any, Job], Any]) -> Any:
        """`work(pipeline, job)` in the model's thread, after the requests before it."""
        job.future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, job, work)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())   # also when no one awaits it
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _call(self, job: Job, work: Callable[[Any, Job], Any]) -> Any:
        job.check()                         # its client left while it waited
        self._running = True
        started = time.monotonic()
        try:
            return work(self.pipeline, job)
        finally:
            self._running = False
            elapsed = time.monotonic() - started
            self._mean_seconds += DURATION_SMOOTHING * (elapsed - self._mean_seconds)

    def close(self) -> None:
        """After the last request: wait for the model's thread, then free the model."""
        self._executor.shutdown(wait=True)
        self.pipeline.close()
