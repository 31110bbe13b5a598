"""What `evaluate`'s metrics hold in memory, per `--n`, against what its memory check counts.

    python bench/evaluate_memory.py                          # n = 250, 500, 1000 at 32³ and 1000, 4000 at 16³
    python bench/evaluate_memory.py --n 256 512 --size 64
    python bench/evaluate_memory.py --before /tmp/old        # an older checkout's package in the rows beside

Each row runs in a fresh process: one real and one generated set of n random volumes, written to .npy files and
memory-mapped as `evaluate` holds them, then the metrics that `evaluate` computes on them (the paper's MMD, the
Gaussian MMD, MS-SSIM, the brain shape, PCA, nearest neighbours). `held` is the peak growth of the process's
anonymous memory (RssAnon, sampled every 2 ms) while they run: what the metrics allocated, not the file's pages,
which the kernel can drop. `counted` is `evaluate.memory_needed` for that n.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORK = """
import json, sys, tempfile, threading, time
from pathlib import Path
import numpy as np
from alphagan import anatomy, metrics
from alphagan.evaluate import memory_needed

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

n, size, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
rng = np.random.default_rng(0)
for name in ("real", "fake"):  # written a chunk at a time: the sets never enter this process's memory whole
    out = np.lib.format.open_memmap(folder / f"{name}.npy", "w+", np.float32, (n, size, size, size))
    for i in range(0, n, 16):
        out[i : i + 16] = rng.uniform(-1, 1, out[i : i + 16].shape)
    del out
real, fake = (np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("real", "fake"))
base, peak, done = anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

watcher = threading.Thread(target=sample)
watcher.start()
metrics.mmd_batchwise(real, fake, 8, 20)
metrics.mmd_gaussian(real, fake)
metrics.diversity(fake, 64)
anatomy.brain_shape(fake, real)
metrics.pca_projection(real, {"model": fake})
metrics.nearest_neighbours(fake, real)
done.set()
watcher.join()
held = max(peak[0], anon()) - base
print(json.dumps({"held": held, "counted": memory_needed(n, size, 1), "set": real.nbytes, "package": metrics.__file__}))
"""


def measure(n: int, size: int, package: str | None) -> dict:
    """One fresh process's peak growth of anonymous memory while the metrics run, and what the check counts."""
    env = dict(os.environ, PYTHONPATH=package) if package else None
    with tempfile.TemporaryDirectory() as folder:
        # Run in the temporary folder: `python -c` puts its working directory first on sys.path, ahead of
        # PYTHONPATH, so from the repository root `--before` would import this checkout's package.
        argv = [sys.executable, "-c", WORK, str(n), str(size), folder]
        done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, cwd=folder)
    row = json.loads(done.stdout.splitlines()[-1])
    if package and not row["package"].startswith(package):
        raise SystemExit(f"--before {package}: the row imported {row['package']}; is it a checkout of alphagan?")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--before", type=Path, default=None, help="an older checkout, measured beside this one")
    args = parser.parse_args()
    grid = [(n, args.size) for n in args.n] if args.n and args.size else [
        (250, 32), (500, 32), (1000, 32), (1000, 16), (4000, 16)
    ]  # fmt: skip
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print("| package | n | size | one set MiB | metrics held MiB | check counts MiB |\n|---|---|---|---|---|---|")
    packages = [("before", str(args.before.resolve()))] if args.before else []
    for n, size in grid:
        for label, package in [*packages, ("this", None)]:
            row = measure(n, size, package)
            print(
                f"| {label} | {n} | {size} | {row['set'] / 2**20:.0f} | {row['held'] / 2**20:.0f} | "
                f"{row['counted'] / 2**20:.0f} |"
            )


if __name__ == "__main__":
    main()
