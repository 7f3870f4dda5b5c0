"""What quantization costs on the official-tiny fixture: logits of the q4_k_m / q8_0 / f16 GGUFs against
the f32 GGUF, on the official LLM input embeddings of the fixture's three clips (reference.npz).

Every model runs with exact attention (no flash attention, f32 KV cache), so the weights are the only
difference. The f32 GGUF follows `steps` greedy tokens; each quantized model is fed the same tokens
(teacher forcing) and scored on max |Δlogit| over the prompt's last position and every step, and on how
many of its greedy choices agree with f32's.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from artefacts import OFFICIAL_TINY

CLIPS = ("speech", "long", "short")
N_CTX = 256


def tensor_types(gguf_path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name.lower() for t in GGUFReader(str(gguf_path)).tensors))


def follow(llm, embeds: np.ndarray, tokens: list[int] | None, steps: int) -> tuple[np.ndarray, list[int]]:
    """Logits at the prompt's last position and after each fed token, (steps + 1, n_vocab), and the
    greedy choices. `tokens` None feeds the model's own greedy choices."""
    llm.reset()
    rows = [llm.decode_embeddings(embeds)]
    for i in range(steps):
        feed = int(np.argmax(rows[-1])) if tokens is None else tokens[i]
        rows.append(llm.decode_tokens([feed]))
    logits = np.stack(rows)
    return logits, [int(i) for i in logits.argmax(axis=1)]


def run(fixture_models: dict[str, Path], steps: int, threads: int) -> dict:
    from salmonn_cli.llm import LlamaModel
    from salmonn_cli.manifest import load_manifest

    with np.load(OFFICIAL_TINY / "reference.npz") as z:
        inputs = {clip: z[f"{clip}.llm_input_embeds"][0] for clip in CLIPS}
        official_last = {clip: z[f"{clip}.last_logits"][0] for clip in CLIPS}

    def gguf(quant: str) -> Path:
        manifest = load_manifest(fixture_models[quant])
        return manifest.path(manifest.llm)

    reference = {}
    with LlamaModel(gguf("f32"), n_ctx=N_CTX, n_threads=threads, exact=True) as llm:
        for clip, embeds in inputs.items():
            reference[clip] = follow(llm, embeds, None, steps)
    vocab = min(len(next(iter(official_last.values()))), reference[CLIPS[0]][0].shape[1])
    results = {"steps": steps, "clips": list(CLIPS), "threads": threads,
               "f32_logit_std": float(np.mean([reference[c][0].std() for c in CLIPS])),
               "f32_vs_official_max_abs": float(max(np.abs(reference[c][0][0, :vocab] - official_last[c][:vocab]).max()
                                                    for c in CLIPS)),
               "quants": {"f32": {"tensor_types": tensor_types(gguf("f32")),
                                  "size_bytes": gguf("f32").stat().st_size}}}
    for quant in fixture_models:
        if quant == "f32":
            continue
        last, every, agree, total = 0.0, 0.0, 0, 0
        with LlamaModel(gguf(quant), n_ctx=N_CTX, n_threads=threads, exact=True) as llm:
            for clip, embeds in inputs.items():
                ref_logits, ref_tokens = reference[clip]
                logits, tokens = follow(llm, embeds, ref_tokens, steps)
                diff = np.abs(logits - ref_logits)
                last = max(last, float(diff[0].max()))
                every = max(every, float(diff.max()))
                agree += sum(a == b for a, b in zip(tokens, ref_tokens))
                total += len(ref_tokens)
        results["quants"][quant] = {"max_abs_last": last, "max_abs_all": every, "agree": agree, "total": total,
                                    "tensor_types": tensor_types(gguf(quant)), "size_bytes": gguf(quant).stat().st_size}
    return results
