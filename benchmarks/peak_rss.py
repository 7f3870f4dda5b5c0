"""Run one command and report its peak resident memory and when its first output appeared.

    python benchmarks/peak_rss.py -- COMMAND [ARGS...]

Prints one JSON object: peak_rss_bytes (ru_maxrss of the waited-for children), wall_s,
first_output_s (first non-blank byte on the command's stdout, from the start), returncode, stdout
and the tail of stderr. Start a fresh helper per measurement: RUSAGE_CHILDREN is the maximum over
every child this process ever waited for.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

READ_BYTES = 1 << 16
STDERR_TAIL_CHARS = 2000
KIB = 1024   # Linux reports ru_maxrss in KiB


def measure(command: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    stdout = bytearray()
    first_output = None
    while chunk := os.read(proc.stdout.fileno(), READ_BYTES):
        if first_output is None and chunk.strip():
            first_output = time.perf_counter() - start
        stdout += chunk
    returncode = proc.wait()
    wall = time.perf_counter() - start
    drain.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * KIB
    return {"peak_rss_bytes": peak, "wall_s": wall, "first_output_s": first_output, "returncode": returncode,
            "stdout": stdout.decode("utf-8", errors="replace"),
            "stderr_tail": b"".join(stderr_chunks).decode("utf-8", errors="replace")[-STDERR_TAIL_CHARS:]}


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(measure(argv[argv.index("--") + 1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
