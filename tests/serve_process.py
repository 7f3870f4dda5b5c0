"""`salmonn serve` in a subprocess for the tests: started on a free port, its log lines collected."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

from conftest import CLI_ENV, default_sigint

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


def environment(changes: dict | None) -> dict:
    env = {**CLI_ENV, **(changes or {})}
    return {k: v for k, v in env.items() if v is not None}


class ServerProcess:
    def __init__(self, *args, timeout: float = 300, env: dict | None = None):
        """`salmonn serve --port 0 ARGS...`; `env` adds to the tests' environment (None values remove)."""
        self.lines: list[str] = []
        self._finished = False               # its stderr has ended
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=environment(env), preexec_fn=default_sigint)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_for(LISTENING.search, timeout)
        except BaseException:
            self.proc.kill()                 # a server that did not start is not left behind
            self.proc.wait()
            raise
        self.url = LISTENING.search(line)[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._finished = True
            self._new_line.notify_all()

    def wait_for(self, match, timeout: float = 60) -> str:
        """The first log line (from the start) for which `match(line)` is true."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if match(line):
                        return line
                if self._finished:
                    raise AssertionError(f"salmonn serve exited with {self.proc.wait()}:\n" + self.log())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("salmonn serve did not log the expected line in time:\n" + self.log())
                self._new_line.wait(min(left, 1.0))

    def log(self) -> str:
        return "\n".join(self.lines)

    def request_lines(self, method_path: str) -> list[str]:
        """The log lines of the requests to e.g. "POST /v1/chat/completions"."""
        return [line for line in self.lines if f'"{method_path}"' in line]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        with self._new_line:                 # the reader takes the last lines
            self._new_line.wait_for(lambda: self._finished, timeout=10)
        return code
