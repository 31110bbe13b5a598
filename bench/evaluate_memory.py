"""What `evaluate`'s metrics hold in memory beyond the volumes, against what its memory check counts.

    python bench/evaluate_memory.py                          # n = 1000, 2000, 4000 at 16³ and 250, 500 at 32³
    python bench/evaluate_memory.py --n 500 1000 --size 64

Each row runs in a fresh process: one real and one generated set of n random volumes, then the metrics that
`evaluate` computes on them (the paper's MMD, the Gaussian MMD, the brain shape, PCA, nearest neighbours). The
growth of the peak resident memory over the two sets is what the metrics held at most; `counted` is
`evaluate.memory_needed` less the two sets. Fit the growth across n to read `VOXEL_BYTES` and `PAIRWISE_BYTES`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

WORK = """
import json, resource, sys
import numpy as np
from alphagan import anatomy, metrics
from alphagan.evaluate import memory_needed
n, size = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
real, fake = (rng.uniform(-1, 1, (n, size, size, size)).astype(np.float32) for _ in range(2))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
metrics.mmd_batchwise(real, fake, 8, 20)
metrics.mmd_gaussian(real, fake)
anatomy.brain_shape(fake, real)
metrics.pca_projection(real, {"model": fake})
metrics.nearest_neighbours(fake, real)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"grown": grown, "counted": memory_needed(n, size, 1) - 2 * real.nbytes, "set": real.nbytes}))
"""


def measure(n: int, size: int) -> dict:
    """One fresh process's peak memory growth over its two sets, and what the check counts beside them."""
    done = subprocess.run([sys.executable, "-c", WORK, str(n), str(size)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    grid = [(n, args.size) for n in args.n] if args.n and args.size else [
        (1000, 16), (2000, 16), (4000, 16), (250, 32), (500, 32)
    ]  # fmt: skip
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {resource.getpagesize()}-byte pages")
    print("| n | size | one set MiB | metrics held MiB | check counts MiB |\n|---|---|---|---|---|")
    for n, size in grid:
        row = measure(n, size)
        print(
            f"| {n} | {size} | {row['set'] / 2**20:.0f} | {row['grown'] / 2**20:.0f} | {row['counted'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
