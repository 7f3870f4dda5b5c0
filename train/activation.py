"""Activation tuning, step 1 (paper §3.3): let the instruction-tuned model write long responses with
a reduced LoRA scale, and save them as stage-3 training data.

    python -m train.activation runs/stage2/last.pth --clips clips/ --lora-scale 2.0 \\
        --out runs/stage3/stories.json

A lower LoRA scale moves the model back towards the plain LLM, which still writes long, free-form
text; stage 3 (train/stages/stage3_activation.toml) then trains on these stories at the normal
scale. The output is an annotation file (task `audio_story_telling` unless --task says otherwise).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from salmonn_cli.errors import SalmonnError
from salmonn_cli.prompt import prompt_token_ids
from train.data import (DataError, Sample, Tokenizer, choose_prompt, clip_features, load_wave, read_prompts)
from train.loss import encode_batch

STORY_TASK = "audio_story_telling"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3")
DEFAULT_LORA_SCALE = 2.0        # half the official 4.0 (alpha 16 instead of 32)
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "stages" / "prompts.json"


def list_clips(paths: list[str]) -> list[Path]:
    """Audio files, folders of audio files, or .txt files listing one audio path per line."""
    clips: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            clips += sorted(p for p in item.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        elif item.suffix == ".txt" and item.is_file():
            lines = [line.strip() for line in item.read_text().splitlines() if line.strip()]
            clips += [p if p.is_absolute() else item.parent / p for p in map(Path, lines)]
        else:
            clips.append(item)
    if not clips:
        raise DataError("no audio clips given")
    return clips


def write_stories(checkpoint: Path, clips: list[Path], out: Path, *, lora_scale: float = DEFAULT_LORA_SCALE,
                  prompts_path: Path = DEFAULT_PROMPTS, task: str = STORY_TASK,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 0.9,
                  num_beams: int = 1, seed: int = 0, log=print) -> list[dict]:
    from train.official import checkpoint_sources, load_official

    sources = checkpoint_sources(Path(checkpoint))
    model, config = load_official(Path(checkpoint), sources["whisper"], sources["beats"], sources["llm"])
    prompts = read_prompts(prompts_path, config)
    if task not in prompts:
        raise DataError(f"{prompts_path} has no prompt for task {task!r}")
    tokenizer = Tokenizer(sources["llm"])
    model.lora_scale = lora_scale
    torch.manual_seed(seed)
    entries = []
    for i, clip in enumerate(clips):
        sample = Sample(path=str(Path(clip).resolve()), text="", task=task)
        mel, fbank = clip_features(load_wave(sample, config), config)
        ids_before, ids_after = prompt_token_ids(config, choose_prompt(prompts, sample, seed, i), tokenizer.encode)
        with torch.no_grad():
            audio = encode_batch(model, torch.from_numpy(mel)[None], [torch.from_numpy(fbank)])
            embeds = model.llm_input_embeds(audio, ids_before, ids_after)
            ids = model.llm.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                top_p=top_p if temperature > 0 else None, num_beams=num_beams,
                eos_token_id=config.llm.eos_token_id, pad_token_id=config.llm.eos_token_id,
                bos_token_id=config.llm.bos_token_id)[0].tolist()
        ids = [t for t in ids if t not in (config.llm.eos_token_id, config.llm.bos_token_id)]
        text = tokenizer.decode(ids).strip()
        entries.append({"path": sample.path, "text": text, "task": task})
        log(f"[{i + 1}/{len(clips)}] {clip}: {len(ids)} tokens")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"annotation": entries}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.activation", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="stage-2 checkpoint (names its base models)")
    parser.add_argument("--clips", nargs="+", required=True, help="audio files, folders, or .txt lists")
    parser.add_argument("--out", type=Path, required=True, help="annotation file to write")
    parser.add_argument("--lora-scale", type=float, default=DEFAULT_LORA_SCALE,
                        help=f"reduced LoRA scale while writing [default: {DEFAULT_LORA_SCALE}]")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt file")
    parser.add_argument("--task", default=STORY_TASK, help=f"prompt task and annotation task [{STORY_TASK}]")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_stories(args.checkpoint, list_clips(args.clips), args.out, lora_scale=args.lora_scale,
                      prompts_path=args.prompts, task=args.task, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed,
                      log=lambda m: print(m, file=sys.stderr))
    except SalmonnError as exc:
        print(f"train.activation: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
