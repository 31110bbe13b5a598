"""Iterations per second and peak memory of the alpha-WGAN-GP training loop, variant by variant, in one run.

    python bench/train_step.py                 # a CPU-sized grid (32^3 and 64^3 at width 16)
    python bench/train_step.py --grid gpu      # the paper's 64^3 / width 64 and 128^3, fp32 vs bf16, compile
    python bench/train_step.py --grid critic   # the cost of config.LEARNS, layer norm and five critic steps, at 32^3
    python bench/train_step.py --grid cpu-bf16 # bf16 autocast against fp32 on a CPU, as written and with 5 critic steps
    python bench/train_step.py --before /tmp/old   # each variant also with an older checkout's package

Every variant runs the real loop (`alphagan.train.train`) in its own process on a prepared cache, so peak memory
is that variant's alone; the first `--warmup` iterations (cuDNN autotuning, compilation) are not timed, nor the
last, after which `train()` saves a picture and a checkpoint. `--before` takes a checkout from d1f1837 on.
"The authors' recipe" is the same loop in fp32 without channels_last, plus what their data pipeline costs today:
every batch read from NIfTI files and resized to the cube on the fly, measured here on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ablation import VARIANTS  # bench/ablation.py, beside this script: the variants whose cost is measured here

from alphagan.config import LEARNS

ALL_THREE = VARIANTS["lambda_rec 1000, critic_norm layer, d_steps 5"]  # LEARNS until lambda_rec alone sufficed
CPU_NETS = dict(size=32, width=16, batch=4, code_hidden=1024)  # the cpu profile's (code discriminator 1024 wide)
GRIDS = {
    "cpu": [CPU_NETS, {**CPU_NETS, "channels_last": True}, {**CPU_NETS, "size": 64}, {**CPU_NETS, "compile": True}],
    "critic": [  # the cpu profile as written, with LEARNS, then the ablation's λ₂ + layer norm and all three
        CPU_NETS,
        {**CPU_NETS, **LEARNS},
        {**CPU_NETS, **VARIANTS["lambda_rec 1000, critic_norm layer"]},
        {**CPU_NETS, **ALL_THREE},
    ],
    "cpu-bf16": [
        CPU_NETS,
        {**CPU_NETS, "precision": "bf16"},
        {**CPU_NETS, **ALL_THREE},
        {**CPU_NETS, **ALL_THREE, "precision": "bf16"},
    ],
    "gpu": [
        dict(size=64, width=64, batch=4, precision="bf16"),
        dict(size=64, width=64, batch=4, precision="bf16", cuda_graphs=False),
        dict(size=64, width=64, batch=4, precision="fp32"),
        dict(size=64, width=64, batch=4, precision="fp32", cuda_graphs=False),
        dict(size=64, width=64, batch=4, precision="fp16"),
        dict(size=64, width=64, batch=4, precision="bf16", channels_last=True),
        dict(size=64, width=64, batch=16, precision="bf16"),
        dict(size=128, width=64, batch=4, precision="bf16"),
        dict(size=128, width=32, batch=4, precision="bf16"),
        dict(size=64, width=64, batch=4, precision="bf16", compile=True),
    ],
}


def run_variant(
    data: Path, variant: dict, iters: int, warmup: int, out: Path, pythonpath: str | None = None, timeout: float = 600
) -> dict:
    """Train `warmup + iters` iterations in a fresh process; returns it/s of the timed part and peak memory.

    `pythonpath` runs another copy of the package (an older commit, for a before/after comparison)."""
    code = f"""
import json, resource, time, torch
from alphagan.config import make_config
from alphagan.train import train
v, first, last = {variant!r}, {warmup}, {warmup + iters}
marks = {{}}
def mark(done):  # the clock at the end of iterations `first` and `last`
    if done in (first, last):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks[done] = time.perf_counter()
# One iteration more than timed: train() saves a picture and a checkpoint after its last one.
cfg = make_config("paper", latent=1000, iters=last + 1, sample_every=10**9, ckpt_every=10**9, n_fixed=2,
                  n_subjects=16, **v)
train(cfg, {str(data)!r}, {str(out)!r}, progress=False, after_iteration=mark)
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else \\
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({{"it_per_s": (last - first) / (marks[last] - marks[first]), "peak_gb": peak}}))
"""
    env = dict(os.environ)
    if pythonpath:  # first on the path, so that its `alphagan` is the one imported
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    try:
        # Run outside the repository: `python -c` puts the working directory first on sys.path, ahead of
        # PYTHONPATH, so from the repository root `--before` would silently import this checkout's package.
        out.parent.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1][:100]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def nifti_batch_seconds(folder: Path, size: int, batch: int, repeats: int = 5) -> float:
    """Seconds to read `batch` NIfTI files and resize them to size^3, as a per-item data loader does."""
    from alphagan.data.cache import Settings
    from alphagan.data.prepare import preprocess

    files = sorted(folder.glob("*.nii.gz"))
    start = time.perf_counter()
    for r in range(repeats):
        for i in range(batch):
            preprocess(files[(r * batch + i) % len(files)], Settings(size=size))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument(
        "--before", default=None, help="a folder holding an older checkout's `alphagan`: each variant runs with it too"
    )
    args = parser.parse_args()

    import torch

    from alphagan.data.prepare import prepare
    from alphagan.data.synth import make_cohort

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; {args.iters} timed iterations after {args.warmup}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        caches, raw = {}, {}
        for size in sorted({v["size"] for v in GRIDS[args.grid]}):
            raw[size] = make_cohort(tmp / f"raw{size}", args.subjects, size=min(2 * size, 128), progress=False)
            caches[size] = prepare(str(raw[size]), tmp / f"cache{size}", size=size, progress=False).out
        for i, variant in enumerate(GRIDS[args.grid]):
            cache = caches[variant["size"]]
            if args.before:  # the older loop first, then this one, for the same variant: side by side, same load
                old = run_variant(cache, variant, args.iters, args.warmup, tmp / f"old{i}", args.before)
                rows.append(({**variant, "recipe": "before"}, old))
            result = run_variant(cache, variant, args.iters, args.warmup, tmp / f"run{i}")
            rows.append((variant, result))
        # The authors' recipe: the loop in fp32, and three batches (2 E+G steps, 1 D step) loaded from NIfTI.
        first = GRIDS[args.grid][0]
        base = dict(first, precision="fp32", cuda_graphs=False, channels_last=False, compile=False)
        loop = run_variant(caches[base["size"]], base, args.iters, args.warmup, tmp / "authors")
        data_s = 3 * nifti_batch_seconds(raw[base["size"]], base["size"], base["batch"])
        if "it_per_s" in loop:
            authors = 1.0 / (1.0 / loop["it_per_s"] + data_s)
            rows.append(({**base, "recipe": "authors'"}, {"it_per_s": authors, "peak_gb": loop["peak_gb"]}))

    print_table(rows, base)


# Settings with a column of their own, or the same in every variant of a grid (code_hidden); any other setting
# of a variant is listed under "other settings".
SHOWN = {"model", "size", "width", "batch", "precision", "channels_last", "compile", "cuda_graphs", "recipe",
         "code_hidden"}  # fmt: skip


def print_table(rows: list[tuple[dict, dict]], base: dict) -> None:
    """The grid as a Markdown table; speed-ups against the authors' recipe where the configuration matches."""
    authors = next((r["it_per_s"] for v, r in rows if v.get("recipe") == "authors'"), None)
    header = (
        "model | size | width | batch | precision | channels_last | compile | CUDA graphs | recipe | other settings | "
        "it/s | peak GB"
    )
    print(f"| {header} | vs authors' |")
    print("|---" * 13 + "|")
    for v, r in rows:
        cells = [
            v.get("model", "alpha-wgan-gp"),
            v["size"],
            v["width"],
            v["batch"],
            v.get("precision", "auto"),
            v.get("channels_last", False),
            v.get("compile", False),
            v.get("cuda_graphs", True) and v.get("recipe") != "authors'",
            v.get("recipe", "ours"),
            ", ".join(f"{k} {x}" for k, x in v.items() if k not in SHOWN) or "as written",
        ]
        if "error" in r:
            result = f"failed: {r['error']} | | "
        else:
            same = authors and (v["size"], v["width"], v["batch"]) == (base["size"], base["width"], base["batch"])
            ratio = f"{r['it_per_s'] / authors:.1f}x" if same else ""
            result = f"{r['it_per_s']:.2f} | {r['peak_gb']:.2f} | {ratio}"
        print("| " + " | ".join(map(str, cells)) + f" | {result} |")


if __name__ == "__main__":
    main()
