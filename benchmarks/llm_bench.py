"""Prefill and decode speed of our runtime against llama.cpp's own generation, same process.

"Ours" is `Pipeline.answer`, the path `salmonn ask` takes: prompt ids, three `llama_decode` calls
for the prompt (BOS + text, audio embeddings, text), then `decoding.decode` (numpy greedy over a
copy of the logits, text streaming) stepping `LlamaModel.decode_tokens`. The reference is a tight
loop straight on llama.cpp's C API over the very same context (same GGUF, same settings, same
threads): the same three prompt batches, then `llama_sampler_sample` (greedy argmax in C) and a
one-token `llama_batch_get_one` per step. Both decode a fixed number of steps (EOS cannot end
either: it is suppressed in ours and ignored in the loop); the runs alternate.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from pathlib import Path

import numpy as np

import salmonn_cli.llm  # noqa: F401  first: it loads the CUDA libraries llama.cpp's CUDA build binds to
from salmonn_cli.decoding import DecodingOptions, SuppressTokens
from salmonn_cli.prompt import build_prompt

import llama_cpp  # noqa: E402  (isort: skip)

DEFAULT_PROMPT = "Describe the audio."


def _decode(ctx, batch) -> None:
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def _decode_token_ids(ctx, ids: list[int]) -> None:
    array = (llama_cpp.llama_token * len(ids))(*ids)
    _decode(ctx, llama_cpp.llama_batch_get_one(array, len(ids)))


def _decode_embeddings(ctx, embeds: np.ndarray, start: int) -> None:
    n, width = embeds.shape
    batch = llama_cpp.llama_batch_init(n, width, 1)
    try:
        ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        _decode(ctx, batch)
    finally:
        llama_cpp.llama_batch_free(batch)


def llama_cpp_generation(llm, ids_before: list[int], embeds: np.ndarray, ids_after: list[int],
                         steps: int) -> tuple[float, float, list[int]]:
    """llama.cpp's own loop on `llm`'s context: (prefill s, decode s, tokens)."""
    ctx = llm._ctx           # the context our runtime decodes with: identical model and settings
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    sampler = llama_cpp.llama_sampler_init_greedy()
    token_array = (llama_cpp.llama_token * 1)()
    try:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        _decode_token_ids(ctx, ids_before)
        _decode_embeddings(ctx, embeds, len(ids_before))
        _decode_token_ids(ctx, ids_after)
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(steps):
            token_array[0] = token
            _decode(ctx, llama_cpp.llama_batch_get_one(token_array, 1))
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            tokens.append(token)
        done = time.perf_counter()
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llm.reset()
    return prefilled - start, done - prefilled, tokens


def first_token_seconds(pipeline, clip: Path, prompt: str) -> dict:
    """A loaded model, an audio file: seconds until the first answer token is chosen."""
    from salmonn_cli.ask import embed_file

    chosen = []
    start = time.perf_counter()
    audio = embed_file(pipeline, str(clip), truncate=True)
    answer = pipeline.answer(audio.embeds, prompt, DecodingOptions(max_tokens=1),
                             stop=lambda tokens: chosen.append(time.perf_counter()))
    return {"first_token_s": chosen[0] - start, "encode_s": audio.encode_s, "prefill_s": answer.prefill_s}


def run(model_dirs: dict[str, Path], clip: Path, steps: int, repeats: int, threads: int,
        prompt: str = DEFAULT_PROMPT, device: str = "auto") -> dict:
    from salmonn_cli.audio import load_audio
    from salmonn_cli.pipeline import Pipeline, RuntimeOptions

    results = {}
    embeds = None
    for quant, model_dir in model_dirs.items():
        with Pipeline(str(model_dir), RuntimeOptions(n_threads=threads, device=device),
                      DecodingOptions(max_tokens=steps + 1, beams=1)) as pipeline:
            if embeds is None:
                embeds, _ = pipeline.embed_wave(load_audio(clip, pipeline.config.sample_rate))
            llm = pipeline.llm
            pipeline.suppress = SuppressTokens(pipeline.suppress.token_ids + [llm.eos_id])   # a fixed number of steps
            ids = build_prompt(pipeline.config, prompt, llm.tokenize)
            ids_before = [llm.bos_id] + ids.ids_before
            options = DecodingOptions(max_tokens=steps + 1)

            def ours():
                answer = pipeline.answer(embeds, prompt, options)
                return answer.prefill_s, answer.decode_s, answer.tokens

            def reference():
                return llama_cpp_generation(llm, ids_before, embeds, ids.ids_after, steps)

            pipeline.answer(embeds, prompt, DecodingOptions(max_tokens=2))      # warm-up
            reference_tokens = reference()[2]
            runs = {"ours": [], "llama_cpp": []}
            for i in range(repeats):
                order = (("ours", ours), ("llama_cpp", reference))
                for name, fn in order if i % 2 == 0 else order[::-1]:
                    runs[name].append(fn())
            ours_tokens = runs["ours"][-1][2]
            row = {"prompt_tokens": len(ids_before) + len(embeds) + len(ids.ids_after), "decode_steps": steps,
                   "same_tokens": ours_tokens == reference_tokens[:len(ours_tokens)]}
            for name, timings in runs.items():
                row[name] = {"prefill_s": statistics.median(t[0] for t in timings),
                             "decode_s": statistics.median(t[1] for t in timings),
                             "runs": [[t[0], t[1]] for t in timings]}
            row["warm_first_token"] = first_token_seconds(pipeline, clip, prompt)
            row["encoder_provider"] = pipeline.encoder.provider
            row["placement"] = pipeline.placement.as_dict()
            results[quant] = row
    return {"threads": threads, "quants": results, "llama_cpp_python": llama_cpp.__version__}
