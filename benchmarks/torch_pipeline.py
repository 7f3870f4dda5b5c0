"""The PyTorch reference pipeline on official-format files, for the pipeline benchmark.

Our PyTorch SALMONN (transformers' WhisperEncoder, BEATs, window Q-Former, the LLaMA with its LoRA
through peft; fp32, eager) loaded from the four official files, the official preprocessing
(WhisperFeatureExtractor log-mel, BEATs fbank), then transformers `generate(inputs_embeds=...)`, greedy,
exactly `--tokens` + 1 new tokens (EOS suppressed) so that `--tokens` decode steps are timed.

    python benchmarks/torch_pipeline.py --ckpt C --whisper W --beats B --llm L --clip X --tokens N --threads T

Prints the first generated token as soon as it is chosen (a parent times the first output), then
one line `RESULT {json}` with the timings in seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

RESULT_PREFIX = "RESULT "
PAGE_BYTES = 4096
DEFAULT_PROMPT = "Describe the audio."


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def run(args) -> dict:
    import numpy as np
    import sentencepiece
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, WhisperFeatureExtractor

    from salmonn_cli import audio, features
    from train.official import load_official

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, config = load_official(args.ckpt, args.whisper, args.beats, args.llm)
    spm = sentencepiece.SentencePieceProcessor(model_file=f"{args.llm}/tokenizer.model")
    extractor = WhisperFeatureExtractor(feature_size=config.whisper.n_mels)
    loaded = time.perf_counter()
    rss_loaded = resident_bytes()

    class StepClock(LogitsProcessor):
        """Called once per generated token, right after the forward pass that produced its logits."""
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            if len(self.times) == 1:
                sys.stdout.write(spm.id_to_piece(int(scores[0].argmax())) + "\n")
                sys.stdout.flush()
            return scores

    with torch.no_grad():
        start = time.perf_counter()
        wave, _ = audio.fit_to_chunk(audio.load_audio(args.clip, config.sample_rate), config.sample_rate,
                                     config.min_seconds, config.max_seconds)
        mel = extractor(wave, sampling_rate=config.sample_rate, return_tensors="np")["input_features"]
        fbank = features.beats_fbank(wave)[None].astype(np.float32)
        featured = time.perf_counter()
        audio_embeds = model.encode_audio(torch.from_numpy(mel), torch.from_numpy(fbank))
        encoded = time.perf_counter()
        before, after = config.prompt_pieces(args.prompt)
        embeds = model.llm_input_embeds(audio_embeds, spm.encode(before), spm.encode(after))
        clock = StepClock()
        generate_start = time.perf_counter()
        out = model.llama_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1, do_sample=False, num_beams=1,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=config.llm.eos_token_id)
    return {
        "load_s": loaded - t0, "rss_loaded_bytes": rss_loaded, "features_s": featured - start, "encode_s": encoded - featured,
        "prompt_tokens": int(embeds.shape[1]),
        "prefill_s": clock.times[0] - generate_start,
        "decode_steps": len(clock.times) - 1, "decode_s": clock.times[-1] - clock.times[0],
        "first_token_warm_s": clock.times[0] - start,
        "tokens": [int(t) for t in out[0, -(args.tokens + 1):]],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--ckpt", "--whisper", "--beats", "--llm", "--clip"):
        ap.add_argument(name, required=True)
    ap.add_argument("--tokens", type=int, required=True, help="decode steps to time")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = ap.parse_args(argv)
    print(RESULT_PREFIX + json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
