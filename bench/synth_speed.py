"""How fast the synthetic cohort is made and written, and how fast `prepare` turns it into a cache.

    python bench/synth_speed.py --n 500 --size 64          # the issue's target: 500 subjects at 64^3 < 60 s
    python bench/synth_speed.py --n 40 --size 1mm --prepare  # prepare speed on 1 mm volumes

Prints a table; the timings include loading the templates (once per process) and writing .nii.gz files.
"""

import argparse
import os
import tempfile
import time

import torch

from alphagan.cli import _size
from alphagan.data.prepare import prepare
from alphagan.data.synth import make_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--size", type=_size, default=64)
    parser.add_argument("--kind", default="normal")
    parser.add_argument("--prepare", action="store_true", help="also time `prepare` to 64^3 on the cohort")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_cohort(f"{tmp}/cohort", args.n, size=args.size, kind=args.kind, progress=False)
        seconds = time.perf_counter() - start
        rows.append((f"synth {args.kind} {args.size or '1mm'}", args.n, seconds))
        if args.prepare:
            start = time.perf_counter()
            prepare(f"{tmp}/cohort", f"{tmp}/cache", size=64, progress=False)
            rows.append(("prepare -> 64^3", args.n, time.perf_counter() - start))
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | volumes | seconds | volumes/s |\n|---|---|---|---|")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s:.1f} | {n / s:.1f} |")


if __name__ == "__main__":
    main()
