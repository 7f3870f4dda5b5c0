"""How many llama.cpp threads should `salmonn ask` use by default?

Measures prefill and decode speed of our llama.cpp wrapper for n_threads 1..cores, once on an idle
machine and once with one core kept busy by another process (what a laptop running anything else
looks like). Ratios against the 1-thread run of the same condition, same process.

    python benchmarks/llm_threads.py MODEL.gguf [--tokens 64] > benchmarks/llm_threads.txt
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time

import numpy as np

from salmonn_cli.llm import LlamaModel

PREFILL_TOKENS = 100


def spin(stop) -> None:
    while not stop.is_set():
        pass


def measure(path: str, n_threads: int, n_decode: int) -> tuple[float, float]:
    with LlamaModel(path, n_ctx=PREFILL_TOKENS + n_decode + 8, n_threads=n_threads) as llm:
        prompt = [llm.bos_id] + [(i * 37) % 1000 + 100 for i in range(PREFILL_TOKENS - 1)]
        llm.decode_tokens(prompt[:8])          # warm-up
        llm.reset()
        t0 = time.perf_counter()
        logits = llm.decode_tokens(prompt)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            logits = llm.decode_tokens([int(np.argmax(logits))])
        t2 = time.perf_counter()
    return PREFILL_TOKENS / (t1 - t0), n_decode / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"# {os.path.basename(args.model)}; {platform.processor() or platform.machine()}, {cores} cores")
    print("condition        threads  prefill tok/s  decode tok/s  decode vs 1 thread")
    for busy in (False, True):
        stop = mp.Event()
        hog = mp.Process(target=spin, args=(stop,)) if busy else None
        if hog:
            hog.start()
            time.sleep(0.5)
        try:
            base = None
            for n in range(1, cores + 1):
                prefill, decode = measure(args.model, n, args.tokens)
                base = base or decode
                label = "one core busy" if busy else "idle"
                print(f"{label:<16} {n:>7}  {prefill:>13.1f}  {decode:>12.1f}  {decode / base:>17.2f}x")
        finally:
            if hog:
                stop.set()
                hog.join()


if __name__ == "__main__":
    main()
