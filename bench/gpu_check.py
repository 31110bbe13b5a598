"""The prepared GPU check: one command, about 9 minutes on one GPU, one Markdown report.

    python bench/gpu_check.py --out report.md                  # on a CUDA GPU
    python bench/gpu_check.py --dry-run --out /tmp/report.md   # anywhere: every section at toy sizes

Each section runs in its own process under its own time limit, so a failure costs only its own minutes, and the
report is rewritten after each section, so a check stopped at its limit still leaves what it measured:
  1. device: the GPU, PyTorch, native bf16, and the bf16 matrix-product rate (the card's practical ceiling);
     layers: each layer the networks compute in a faster form, against the plain layer (bench/layers.py);
  2. cohort: the synthetic training cohort made in parallel processes, then found in its cache by a second call;
  3. grid: the training loop variant by variant (fp32, bf16, fp16, CUDA graphs, channels_last, compile, batch 16,
     128^3), the four models, the loop of an older commit (`--before DIR`, a copy of its `alphagan` package's
     parent folder) and the authors' recipe (the fp32 eager loop plus NIfTI decoding per batch);
  4. profile: the 15 costliest kernels of one eager bf16 iteration (torch.profiler) and its FLOPs;
  5. notebook: notebook 03 under papermill at the `gpu` profile, with `--nb-iters` iterations;
  6. tools: `sample` and `evaluate` from the command line on notebook 03's model.
`--figures DIR` copies the pictures worth looking at into DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = {  # name: seconds allowed on a GPU
    "device": 20,
    "layers": 30,
    "cohort": 100,
    "grid": 230,
    "profile": 40,
    "notebook": 110,
    "tools": 150,
}


def _sizes(dry: bool) -> dict:
    """Everything that differs between the real check and the dry run."""
    if dry:
        return dict(
            n=8, size=16, width=4, latent=16, iters=4, warmup=2, nb_profile="smoke", resume=2, eval_n=8, pairs=10
        )
    return dict(
        n=991, size=64, width=64, latent=1000, iters=100, warmup=10, nb_profile="gpu", resume=50, eval_n=128, pairs=300
    )


def section_device(args: argparse.Namespace) -> str:
    import torch

    lines = [f"- PyTorch {torch.__version__}, {os.cpu_count()} CPU cores"]
    if not torch.cuda.is_available():
        return "\n".join([*lines, "- no CUDA device: a dry run on the CPU"])
    props = torch.cuda.get_device_properties(0)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    lines += [
        f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
        f"CUDA {torch.version.cuda}, native bf16: {native}",
        f"- bf16 8192³ matrix product: {tflops:.0f} TFLOP/s (the ceiling the loop is compared with)",
    ]
    return "\n".join(lines)


def section_layers(args: argparse.Namespace) -> str:
    from layers import table

    return table("smoke" if args.dry_run else "gpu")


def section_cohort(args: argparse.Namespace) -> str:
    from alphagan.data.cache import synthetic_cache
    from alphagan.data.dataset import load_training_volumes

    s = _sizes(args.dry_run)
    start = time.perf_counter()
    synthetic_cache(s["n"], s["size"], workers=os.cpu_count())
    made = time.perf_counter() - start
    start = time.perf_counter()
    volumes, fov = load_training_volumes("synth", s["size"], s["n"])
    again = time.perf_counter() - start
    return (
        f"- {s['n']} subjects at {s['size']}³ made in {made:.1f} s with {os.cpu_count()} processes "
        f"({s['n'] / made:.1f} subjects/s)\n"
        f"- the same settings again: found in the cache in {again:.2f} s ({volumes.shape}, cube {fov:.0f} mm)"
    )


def section_grid(args: argparse.Namespace) -> str:
    import torch
    from train_step import GRIDS, nifti_batch_seconds, print_table, run_variant

    from alphagan.data.cache import synthetic_cache
    from alphagan.data.synth import make_cohort

    s = _sizes(args.dry_run)
    work = Path(args.work) / "grid"
    if args.dry_run:
        base = dict(size=16, width=4, batch=2)
        variants = [
            {**base, "precision": "fp32", "cuda_graphs": False},
            {**base, "precision": "bf16"},
            {**base, "precision": "fp16"},
            {**base, "model": "wgan-gp"},
        ]
    else:
        variants = [
            *GRIDS["gpu"],
            *(dict(size=64, width=64, batch=4, model=m) for m in ("alpha-gan", "wgan-gp", "vae-gan")),
        ]
    caches = {v["size"]: synthetic_cache(16, v["size"]) for v in variants}
    rows, first = [], variants[0]
    if args.before:  # the same loop as an older commit ran it (its defaults: bf16 autocast on CUDA, no graphs)
        before = {k: first[k] for k in ("size", "width", "batch")}
        result = run_variant(caches[first["size"]], before, s["iters"], s["warmup"], work / "before", args.before, 60)
        rows.append(({**before, "recipe": "before"}, result))
        print(f"grid: before {result}", file=sys.stderr, flush=True)
    for i, variant in enumerate(variants):
        long = variant["size"] > 64 or variant["batch"] > 4
        iters = max(s["iters"] // 4, 2) if long else s["iters"]
        result = run_variant(caches[variant["size"]], variant, iters, s["warmup"], work / f"run{i}", timeout=60)
        rows.append((variant, result))
        print(f"grid {i + 1}/{len(variants)}: {variant} {result}", file=sys.stderr, flush=True)
    fp32 = next((r for v, r in rows if v.get("precision") == "fp32" and v.get("cuda_graphs") is False), {})
    if "it_per_s" in fp32:
        raw = make_cohort(work / "raw", 8, size=min(2 * first["size"], 128), progress=False)
        data_s = 3 * nifti_batch_seconds(raw, first["size"], first["batch"])
        authors = 1.0 / (1.0 / fp32["it_per_s"] + data_s)
        rows.append(({**first, "precision": "fp32", "recipe": "authors'"}, {**fp32, "it_per_s": authors}))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = f"{device}; latent 1000 (run_variant's); "
    header += f"{s['iters']} timed iterations after {s['warmup']} (a quarter of them for 128³ and batch 16)\n\n"
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(rows, first)
    return header + table.getvalue()


def section_profile(args: argparse.Namespace) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from alphagan.config import make_config
    from alphagan.train import train

    s = _sizes(args.dry_run)
    cuda = torch.cuda.is_available()
    cfg = make_config(
        "paper", size=s["size"], width=s["width"], latent=s["latent"], iters=14, n_subjects=16, log_every=14,
        sample_every=10**6, ckpt_every=10**6, n_fixed=1, precision="bf16", cuda_graphs=False,
    )  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Iteration 11 of 14: past cuDNN's autotuning, before the last iteration's checkpoint and pictures.
    with profile(activities=activities, schedule=schedule(wait=8, warmup=2, active=1), record_shapes=True) as prof:
        train(cfg, "synth", Path(args.work) / "profile", progress=False, after_iteration=lambda _: prof.step())
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages(group_by_input_shape=True)
    table = events.table(sort_by=sort, row_limit=25, max_name_column_width=50, max_shapes_column_width=70)
    return f"One eager bf16 iteration (the 11th of 14), by GPU time of the kernels themselves:\n\n```\n{table}\n```"


def section_notebook(args: argparse.Namespace) -> str:
    import papermill

    s = _sizes(args.dry_run)
    run_dir = Path(args.work) / "nb03"
    start = time.perf_counter()
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "03_training.ipynb"),
        str(Path(args.work) / "03_training.ipynb"),
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(profile=s["nb_profile"], run_dir=str(run_dir), iters=args.nb_iters, resume_iters=s["resume"]),
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["it_per_s"] for r in records[1:]]
    last = {k: round(v, 3) for k, v in records[-1].items()}
    return (
        f"- notebook 03, profile {s['nb_profile']}, {args.nb_iters} + {s['resume']} iterations: "
        f"{seconds:.0f} s top to bottom\n"
        f"- training speed in the notebook: median {sorted(speeds)[len(speeds) // 2]:.1f} it/s\n"
        f"- last log record: `{json.dumps(last)}`"
    )


def section_tools(args: argparse.Namespace) -> str:
    s = _sizes(args.dry_run)
    work = Path(args.work)
    ckpt = work / "nb03" / "run" / "checkpoints"
    lines = []
    if not ckpt.exists():  # notebook 03 did not run: a short run of our own
        train = ["train", "--data", "synth", "--out", str(ckpt.parent), "--iters", "300", "--n-subjects", "64"]
        train += ["--profile", "smoke" if args.dry_run else "gpu"]
        subprocess.run([sys.executable, "-m", "alphagan", *train], capture_output=True, check=True)
    n = str(s["eval_n"])
    commands = [
        ["sample", "--checkpoint", str(ckpt), "--n", "16", "--out", str(work / "samples")],
        ["evaluate", "--real", "synth", "--checkpoint", str(ckpt), "--out", str(work / "eval"), "--n", n,
         "--pairs", str(4 * s["eval_n"]), "--n-anatomy", str(min(s["eval_n"], 32))],
    ]  # fmt: skip
    for command in commands:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "alphagan", *command], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        status = "ok" if run.returncode == 0 else f"exit {run.returncode}: {run.stderr.strip()[-300:]}"
        lines.append(f"- `python -m alphagan {' '.join(command[:1])} ...`: {seconds:.0f} s, {status}")
    table = work / "eval" / "table.md"
    if table.exists():
        lines += ["", table.read_text().strip()]
    return "\n".join(lines)


def _copy_figures(work: Path, figures: Path) -> None:
    wanted = [
        work / "nb03" / "samples.png",
        work / "nb03" / "loss_curves.png",
        *sorted((work / "nb03" / "run" / "samples").glob("iter_*.png"))[-1:],
        work / "samples" / "samples.png",
        work / "eval" / "pca.png",
    ]
    figures.mkdir(parents=True, exist_ok=True)
    for path in wanted:
        if path.exists():
            shutil.copy(path, figures / f"{path.parent.name}_{path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_report.md", help="the Markdown report")
    parser.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes and the smoke profile, for the CPU")
    parser.add_argument("--before", default=None, help="a folder holding an older commit's alphagan package")
    parser.add_argument("--nb-iters", type=int, default=1000, help="notebook 03's iterations")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--figures", default=None, help="copy the pictures worth looking at here")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section
    args = parser.parse_args()
    if args.section:
        print(globals()[f"section_{args.section}"](args))
        return

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    env = {**os.environ, "ALPHAGAN_CACHE": str(work / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    report = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    for name in [n.strip() for n in args.only.split(",")]:
        limit = SECTIONS[name] * (3 if args.dry_run else 1)
        command = [sys.executable, __file__, "--section", name, "--work", str(work), "--nb-iters", str(args.nb_iters)]
        command += ["--dry-run"] * args.dry_run + (["--before", args.before] if args.before else [])
        start = time.perf_counter()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=env)
            body = (
                run.stdout.strip()
                if run.returncode == 0
                else f"failed (exit {run.returncode}):\n```\n{run.stderr[-1500:]}\n```"
            )
        except subprocess.TimeoutExpired as exc:
            body = f"stopped at its limit of {limit} s\n```\n{(exc.stderr or b'').decode()[-4000:]}\n```"
        report += [f"## {name} ({time.perf_counter() - start:.0f} s)", "", body, ""]
        Path(args.out).write_text("\n".join(report))
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    if args.figures:
        _copy_figures(work, Path(args.figures))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
