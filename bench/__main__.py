"""python -m bench [--only GROUP[,GROUP]]"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

GROUPS = ("data", "training", "inference", "scale", "tune", "compress", "serving")
OUT = Path("data/bench")


def report(group: str, figures: dict[str, float]) -> None:
    for name, value in figures.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"group": group, "unix_time": round(time.time()), "figures": figures}
    (OUT / f"{group}.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default="", help=f"comma-separated groups of {', '.join(GROUPS)}")
    args = p.parse_args(argv)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        p.error(f"unknown benchmark group(s) {unknown}; groups are {', '.join(GROUPS)}")
    for group in groups:
        print(f"# benchmark group: {group}", flush=True)
        report(group, importlib.import_module(f"bench.{group}").run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
