"""The prepared GPU checks: two commands, each fitting one short lease, each writing one folder to commit.

    python bench/gpu_check.py --course --out gpu_course   # the gpu course with --minutes 8, stopped at 9.3 minutes
    python bench/gpu_check.py --step --out gpu_step       # the 64^3 step: roofline and variants, 5 minutes at most
    python bench/gpu_check.py --course --dry-run --out /tmp/c   # anywhere: the same at the smoke profile, on the CPU
    python bench/gpu_check.py --only device,course,grid --notebooks 01,02,03 --minutes 2.8 --deadline 500 \
        --pack $OUT/gpu.tgz                                  # one lease: notebooks 01-03, then the step's variants

Each section runs in its own process under its own time limit, so a failure costs only its own minutes, and the
report (`report.md` in the folder) is rewritten after each section, so a check stopped at its limit, or a machine
taken back, still leaves what it measured. The limits hold on a cold machine: nothing is assumed cached.
  `--course`: device, then course: `python -m alphagan course --profile gpu --minutes 8`, exactly as a learner
     runs it (the defaults: bf16, CUDA graphs), its plan against the minutes each notebook took, then its
     summary, figures and executed notebooks copied into the folder (no checkpoints, no NIfTI files);
  `--step`: device, then roofline (bench/roofline.py at the gpu profile, every model), then grid: the training
     loop variant by variant (CUDA graphs or eager, bf16 or fp32, channels_last, compile, batch 16).
Further sections for `--only`: layers (bench/layers.py), cohort (the synthetic cohort made, then found in its
cache), profile (the 15 costliest kernels of one iteration at the defaults), notebook (notebook 03 under papermill
at the gpu profile, `--nb-iters` iterations), plan (what the course's plan times for notebook 03's runs), tools
(`sample` and `evaluate` on notebook 03's model).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from alphagan.config import MODELS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = {  # name: seconds allowed on a GPU
    "device": 15,
    "course": 560,
    "roofline": 55,
    "grid": 240,
    "layers": 30,
    "cohort": 100,
    "profile": 60,
    "notebook": 300,
    "plan": 60,
    "tools": 150,
}
SUITES = {"course": ["device", "course"], "step": ["device", "roofline", "grid"]}
# The training budget of `--course`. The whole course takes longer than its section's limit on an H200: notebooks
# 01-03 spent 3.2 minutes there besides training (docs/results_gpu.md).
COURSE_MINUTES = 8


def _sizes(dry: bool) -> dict:
    """Everything that differs between the real check and the dry run."""
    if dry:
        return dict(
            n=8, size=16, width=4, latent=16, iters=4, warmup=2, nb_profile="smoke", resume=2, eval_n=8, pairs=10
        )
    return dict(
        n=991, size=64, width=64, latent=1000, iters=50, warmup=10, nb_profile="gpu", resume=50, eval_n=128, pairs=300
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


STEP_VARIANTS = [  # the defaults first; then one change each
    dict(size=64, width=64, batch=4),
    dict(size=64, width=64, batch=4, cuda_graphs=False),
    dict(size=64, width=64, batch=4, precision="fp32"),
    dict(size=64, width=64, batch=4, channels_last=True),
    dict(size=64, width=64, batch=16),
    dict(size=64, width=64, batch=4, compile=True),
]


def section_grid(args: argparse.Namespace) -> str:
    """The training loop (`train()`, in a process of its own) per variant; the defaults first."""
    import torch
    from train_step import print_table, run_variant

    from alphagan.data.cache import synthetic_cache

    s = _sizes(args.dry_run)
    toy = dict(size=s["size"], width=s["width"])
    variants = [{**v, **toy} if args.dry_run else v for v in STEP_VARIANTS]
    caches = {v["size"]: synthetic_cache(16, v["size"]) for v in variants}
    rows = []
    for i, variant in enumerate(variants):
        iters = max(s["iters"] // 4, 2) if variant["batch"] > 4 else s["iters"]
        work = Path(args.work) / "grid" / f"run{i}"
        # A fresh process on a cold GPU: CUDA's libraries load and cuDNN times its kernels for every shape first.
        timeout = (90 if variant.get("compile") else 60) * (3 if args.dry_run else 1)
        rows.append((variant, run_variant(caches[variant["size"]], variant, iters, s["warmup"], work, timeout=timeout)))
        print(f"grid {i + 1}/{len(variants)}: {variant} {rows[-1][1]}", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = f"{device}; latent 1000; {s['iters']} timed iterations after {s['warmup']} (a quarter at batch 16)\n\n"
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(rows, variants[0])
    return header + table.getvalue()


def section_roofline(args: argparse.Namespace) -> str:
    """bench/roofline.py at the gpu profile (smoke in a dry run), every model."""
    from roofline import measure, print_tables

    profile = "smoke" if args.dry_run else "gpu"
    rows = []
    for model in MODELS:
        rows.append(measure(profile, model, iters=3 if args.dry_run else 10))
        print(f"roofline: {model} done", file=sys.stderr, flush=True)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_tables(rows)
    return table.getvalue()


def section_course(args: argparse.Namespace) -> str:
    """The course as a learner runs it on a GPU, then its plan against what each notebook took. Where the plan
    refuses the budget as below the profile's floor, the course runs once more with the budget it names."""
    work, out = Path(args.work) / "course", Path(args.out)
    profile = ["--profile", "smoke"] if args.dry_run else ["--profile", "gpu", "--minutes", str(args.minutes)]
    only = ["--only", args.notebooks] if args.notebooks else []
    lines = []
    for _ in range(2):
        command = [sys.executable, "-m", "alphagan", "course", *profile, *only, "--out", str(work)]
        start = time.perf_counter()
        with open(out / "course.log", "a") as log:
            run = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        minutes, shown = (time.perf_counter() - start) / 60, " ".join(command[3:-2])
        lines.append(f"- `python -m alphagan {shown}`: {minutes:.1f} min, exit {run.returncode}")
        needed = re.findall(r"give --minutes (\d+) or more", (out / "course.log").read_text())
        if run.returncode == 0 or not needed or "--minutes" not in profile:
            break
        profile[-1] = needed[-1]
    _copy_course(work, out / "course")
    lines += ["", *_course_lines(out / "course.log")]
    summary = out / "course" / "summary.md"
    if summary.exists():
        lines += ["", f"Summary: `{summary.relative_to(out)}`"]
    return "\n".join(lines)


def _course_lines(log: Path) -> list[str]:
    """The plan's table and each notebook's time, from the course's log."""
    keep = ("|", "course:", "] ", "FAILED")
    return [line.rstrip() for line in log.read_text().splitlines() if line.startswith(keep) or "done in" in line]


def _copy_course(run: Path, into: Path) -> None:
    """What a course run shows a reader: its summary, executed notebooks, figures, tables and numbers."""
    for path in sorted(run.rglob("*")):
        if (
            path.is_file()
            and path.suffix in (".md", ".ipynb", ".png", ".json", ".jsonl")
            and "checkpoints" not in path.parts
        ):
            target = into / path.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


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
        str(Path(args.out) / "03_training.ipynb"),
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(profile=s["nb_profile"], run_dir=str(run_dir), iters=args.nb_iters, resume_iters=s["resume"]),
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    seconds = time.perf_counter() - start
    _copy_course(run_dir, Path(args.out) / "nb03")
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["it_per_s"] for r in records[1:]]
    last = {k: round(v, 3) for k, v in records[-1].items()}
    return (
        f"- notebook 03, profile {s['nb_profile']}, {args.nb_iters} + {s['resume']} iterations: "
        f"{seconds:.0f} s top to bottom\n"
        f"- training speed in the notebook: median {sorted(speeds)[len(speeds) // 2]:.1f} it/s\n"
        f"- last log record: `{json.dumps(last)}`"
    )


def section_plan(args: argparse.Namespace) -> str:
    """What the course's plan times for notebook 03's runs here, to set beside what training achieved."""
    from alphagan.course.plan import plan_course

    plan = plan_course("smoke" if args.dry_run else "gpu", only=["03"])
    return "\n".join(f"- plan: {' '.join(map(str, kind))}: {1 / s:.1f} it/s" for kind, s in plan.seconds.items())


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
    for path in wanted:
        if path.exists():
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, figures / f"{path.parent.name}_{path.name}")


def _run_section(name: str, args: argparse.Namespace, work: Path, env: dict, left: float) -> str:
    """One section in a process group of its own, so that at its limit (its own, or the `left` seconds of the
    whole check) everything it started stops with it."""
    limit = min(SECTIONS[name] * (3 if args.dry_run else 1), left)
    command = [sys.executable, __file__, "--only", name, "--section", name, "--work", str(work), "--out", str(args.out)]
    command += ["--nb-iters", str(args.nb_iters), "--minutes", str(args.minutes)] + ["--dry-run"] * args.dry_run
    command += ["--notebooks", args.notebooks] if args.notebooks else []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as run:
        try:
            stdout, stderr = run.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            stdout, stderr = run.communicate()
            return f"stopped at its limit of {limit:.0f} s\n```\n{stderr[-3000:]}\n```\n\n{stdout.strip()}"
    if run.returncode != 0:
        return f"failed (exit {run.returncode}):\n```\n{stderr[-1500:]}\n```"
    return stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite = parser.add_mutually_exclusive_group(required=True)
    suite.add_argument("--course", action="store_true", help="the gpu course with --minutes 8 (9.3 minutes at most)")
    suite.add_argument("--step", action="store_true", help="the 64^3 step: roofline and variants (5 minutes at most)")
    suite.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default="gpu_check", help="the folder of the report, figures and notebooks")
    parser.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes and the smoke profile, for the CPU")
    parser.add_argument("--nb-iters", type=int, default=1000, help="notebook 03's iterations (section notebook)")
    parser.add_argument("--notebooks", default=None, help="the course's notebooks, e.g. 01,02,03 (default: all)")
    parser.add_argument("--minutes", type=float, default=COURSE_MINUTES, help="the course's training budget")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for all sections together")
    parser.add_argument("--pack", default=None, help="a .tar.gz of the folder, rewritten after each section")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section
    args = parser.parse_args()
    if args.section:
        print(globals()[f"section_{args.section}"](args))
        return

    sections = SUITES["course"] if args.course else SUITES["step"] if args.step else args.only.split(",")
    unknown = [n for n in sections if n.strip() not in SECTIONS]
    if unknown:
        parser.error(f"--only: no section {unknown}; there are {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    env = {**os.environ, "ALPHAGAN_CACHE": str(work / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    title = "dry run on the CPU" if args.dry_run else "GPU check"
    report = [f"# {title}: {', '.join(sections)} ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    end = time.perf_counter() + (args.deadline or float("inf"))
    for name in [n.strip() for n in sections]:
        start = time.perf_counter()
        left = end - start
        body = _run_section(name, args, work, env, left) if left > 5 else "not run: the deadline had passed"
        report += [f"## {name} ({time.perf_counter() - start:.0f} s)", "", body, ""]
        (out / "report.md").write_text("\n".join(report))
        _copy_figures(work, out / "figures")
        if args.pack:
            _pack(out, Path(args.pack))
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    print((out / "report.md").read_text())


def _pack(folder: Path, archive: Path) -> None:
    """`folder` as one .tar.gz (a lent machine returns few files), replaced whole: a check stopped while it
    packs leaves the previous one."""
    part = archive.with_name(archive.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    part.replace(archive)


if __name__ == "__main__":
    main()
