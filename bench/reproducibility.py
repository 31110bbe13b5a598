"""Does a training run reproduce? The same `cpu`-profile run three times, with 2, 1 and again 2 threads, each in
its own process, then each model evaluated against the same held-out subjects: a digest of the weights and the
metrics of notebook 04, side by side.

    python bench/reproducibility.py --iters 100

Runs with the same thread count on the same machine should agree bit for bit; a different thread count changes
the order in which oneDNN sums inside convolutions, and training carries the rounding differences on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

RUN = """
import hashlib, json, sys, torch
torch.set_num_threads({threads})
from alphagan.config import make_config
from alphagan.evaluate import evaluate
from alphagan.train import train
cfg = make_config("cpu", iters={iters}, sample_every=10**9, ckpt_every={iters})
result = train(cfg, "synth", {out!r} + "/run", progress=False)
digest = hashlib.sha256()
for name in sorted(result.nets):
    for tensor in result.nets[name].state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
metrics = evaluate("synth", [{out!r} + "/run/checkpoints"], {out!r} + "/eval", n=48, pairs=200, n_anatomy=4)
row = next(iter(metrics["models"].values()))
print(json.dumps(dict(digest=digest.hexdigest()[:16], mmd=row["mmd"], gaussian=row["mmd_gaussian"],
                      ms_ssim=row["ms_ssim"], overlap=row["brain_overlap"])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    print(f"cpu profile, {args.iters} iterations, evaluated against 48 held-out subjects\n")
    print("| threads | weights (sha256) | MMD, paper's form | Gaussian MMD² | MS-SSIM | brain overlap |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, threads in enumerate((2, 1, 2)):
            code = RUN.format(threads=threads, iters=args.iters, out=f"{tmp}/{i}")
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp)
            if run.returncode != 0:
                print(f"| {threads} | failed: {run.stderr.strip().splitlines()[-1][:100]} | | | | |")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"| {threads} | {r['digest']} | {r['mmd']:.1f} | {r['gaussian']:.4f} | {r['ms_ssim']:.4f} | "
                f"{r['overlap']:.4f} |"
            )


if __name__ == "__main__":
    main()
