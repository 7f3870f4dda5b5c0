"""`python -m train CONFIG.toml [--resume] [--set section.key=value ...]`: run one training stage.

Under torchrun (`torchrun --nproc_per_node=N -m train CONFIG.toml`) every process runs this and
they train together with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import sys

from salmonn_cli.errors import SalmonnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train one SALMONN stage.")
    parser.add_argument("config", help="stage config (TOML), e.g. train/stages/stage1_pretrain.toml")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pth")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (TOML syntax), e.g. --set optim.max_steps=100")
    args = parser.parse_args(argv)
    try:
        from train.loop import train
        from train.run_config import load_train_config

        checkpoint = train(load_train_config(args.config, args.overrides), resume=args.resume)
    except SalmonnError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"train: checkpoint {checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
