"""`python -m train.nano.make_data OUT_DIR [--seed 0] [--quick] [--scale 1.0] [--jobs N]`: synthesise
the salmonn-nano training, validation and held-out sets (WAV + official-format annotations + prompts).
"""
from __future__ import annotations

import argparse
import sys
import time

from salmonn_cli.errors import SalmonnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.make_data",
                                     description="Make the salmonn-nano data set from a seed.")
    parser.add_argument("out_dir", help="output folder (created; existing files of the set are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="the seed every file depends on (default 0)")
    parser.add_argument("--quick", action="store_true", help="a ~40-clip set for tests and CI")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the full set's clip counts")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: all CPUs)")
    args = parser.parse_args(argv)
    from train.nano.data import make_dataset

    start = time.perf_counter()
    try:
        summary = make_dataset(args.out_dir, seed=args.seed, quick=args.quick, scale=args.scale, jobs=args.jobs)
    except SalmonnError as exc:
        print(f"make_data: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for split, info in summary["splits"].items():
        print(f"{split}: {sum(info['clips'].values())} clips ({info['hours'] * 60:.1f} min), "
              f"{info['entries']} annotations {info['tasks']}", file=sys.stderr)
    print(f"make_data: wrote {args.out_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
