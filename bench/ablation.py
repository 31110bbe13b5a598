"""Why the paper's alpha-WGAN-GP collapses at the `cpu` profile: the paper as written against one change at a time.

Each variant trains the alpha-WGAN-GP on the synthetic cohort (`cpu` profile: 32^3, width 16, latent 1000,
batch 4, 128 subjects) with the paper's settings (`config.as_written`) and the variant's changes, for `--iters`,
once per seed, and is measured at every `--at` iteration against held-out
subjects, as `evaluate` measures it:

- diversity: voxel std across generated volumes / across real ones, and MS-SSIM of generated pairs minus that
  of real pairs (above 0: less diverse than real data, the sign of collapse);
- reconstruction spread: voxel std across G(E(x)) / across the inputs x (0: every input gives one volume);
- reconstruction L1, Gaussian MMD^2, brain overlap (median), NN ratio (memorisation below 1).

Runs are kept under `--out` and reused, so the script can be stopped and started, and `--jobs 2` trains two runs
side by side (one thread each). Every measurement is added to `--results` (bench/ablation.json, committed, with
the machine it ran on), so a later session trains only what is missing. Prints one Markdown table;
docs/method.md holds its last result.

    python bench/ablation.py --iters 3000 --at 1000 3000 --seeds 0 1 --jobs 2
    python bench/ablation.py --iters 5000 --at 1000 5000 --variants "lambda_rec 1000"   # resumes the 3 000 runs
    python bench/ablation.py --table --at 1000 3000 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "paper as written": {},
    "lambda_rec 1000": {"lambda_rec": 1000.0},
    "d_steps 5": {"d_steps": 5},
    "betas (0.5, 0.9)": {"betas": (0.5, 0.9)},
    "critic_norm layer": {"critic_norm": "layer"},
    "lambda_rec 1000, critic_norm layer": {"lambda_rec": 1000.0, "critic_norm": "layer"},
    "lambda_rec 1000, critic_norm layer, d_steps 5": {"lambda_rec": 1000.0, "critic_norm": "layer", "d_steps": 5},
}
COLUMNS = ("voxel std ×", "MS-SSIM − real", "rec. spread ×", "rec. L1", "Gaussian MMD²", "brain overlap", "NN ratio")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / _slug(variant) / f"seed{seed}"


def train_one(variant: str, seed: int, iters: int, at: list[int], out: Path) -> None:
    """Train one variant and seed (a checkpoint at every `at`), reusing a finished run, then measure it."""
    from alphagan.config import as_written, make_config
    from alphagan.course.settings import train_or_reuse

    paper = as_written(make_config("cpu", seed=seed, iters=iters, ckpt_every=min(at), keep_ckpts=iters))
    cfg = paper.replace(**VARIANTS[variant])  # one change at a time, from the paper's own settings
    run = run_dir(out, variant, seed)
    started = time.perf_counter()
    train_or_reuse(cfg, "synth", run)
    seconds = time.perf_counter() - started
    for it in at:
        path = run / f"ablation_{it}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**measure(run, it), "train_s": seconds}))
        os.replace(tmp, path)


def measure(run: Path, iteration: int, n: int = 48, pairs: int = 200) -> dict[str, float]:
    """The table's columns for one checkpoint of one run."""
    import numpy as np
    import torch

    from alphagan import anatomy, metrics
    from alphagan.checkpoint import load_checkpoint
    from alphagan.config import Config
    from alphagan.data.dataset import load_training_volumes
    from alphagan.evaluate import real_volumes
    from alphagan.models import build_networks
    from alphagan.sampling import calibrated_generator, generate, reconstruct

    state = load_checkpoint(run / "checkpoints", iteration)
    cfg = Config.from_dict(state["config"])
    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    real, _, _ = real_volumes("synth", cfg.size, n, cfg.seed)
    training, _ = load_training_volumes("synth", cfg.size, cfg.n_subjects, seed=cfg.seed, progress=False)
    G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    fake = generate(G, n, cfg.latent, seed=cfg.seed + 2)[:, 0].numpy()
    x = torch.from_numpy(np.array(real[:8], dtype=np.float32))[:, None]
    rec = reconstruct(nets["E"], nets["G"], x)

    ms_fake, _ = metrics.diversity(fake, pairs, seed=0)
    ms_real, _ = metrics.diversity(real, pairs, seed=0)
    return {
        "voxel std ×": metrics.spread(fake) / metrics.spread(real),
        "MS-SSIM − real": ms_fake - ms_real,
        "rec. spread ×": metrics.spread(rec) / metrics.spread(x),
        "rec. L1": float((rec - x).abs().mean()),
        "Gaussian MMD²": metrics.mmd_gaussian(real, fake)[0],
        "brain overlap": anatomy.brain_shape(fake, real).generated_median,
        "NN ratio": metrics.memorisation(fake, training, real).ratio,
    }


def _key(variant: str, seed: int, iteration: int) -> str:
    return f"{variant} | seed {seed} | {iteration}"


def collect(out: Path, results: Path) -> dict[str, dict]:
    """Every measurement in `results`, plus those of runs under `out` not yet recorded (then saved back)."""
    known = json.loads(results.read_text()) if results.exists() else {}
    from alphagan.device import machine as this_machine

    machine = this_machine()
    for variant in VARIANTS:
        for path in run_dir(out, variant, 0).parent.glob("seed*/ablation_*.json"):
            seed, it = int(path.parent.name[4:]), int(path.stem.split("_")[1])
            known.setdefault(_key(variant, seed, it), {**json.loads(path.read_text()), "machine": machine})
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, results)
    return known


def table(known: dict[str, dict], variants: list[str], seeds: list[int], at: list[int]) -> str:
    """One row per variant and iteration: each column's value for every seed measured ("a / b")."""
    lines = [
        "| variant | iterations | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for variant in variants:
        for it in at:
            rows = {s: known[_key(variant, s, it)] for s in seeds if _key(variant, s, it) in known}
            if not rows:
                continue
            cells = [" / ".join(f"{r[c]:.3f}" for r in rows.values()) for c in COLUMNS]
            seeds_text = ", ".join(map(str, rows))
            lines.append(f"| {variant} | {it} | {seeds_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--at", type=int, nargs="+", default=[1000, 3000], help="iterations measured")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (threads split among them)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("ablation.json"))
    parser.add_argument("--table", action="store_true", help="print the table of what is measured; train nothing")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.table and any(args.iters % a for a in args.at):
        parser.error("every --at must divide --iters (checkpoints are written every min(--at) iterations)")
    if args.one:
        train_one(args.one[0], int(args.one[1]), args.iters, args.at, args.out)
        return
    known = collect(args.out, args.results)
    todo = [] if args.table else [(v, s) for v in args.variants for s in args.seeds]
    todo = [(v, s) for v, s in todo if any(_key(v, s, a) not in known for a in args.at)]
    threads = str(max(1, (os.cpu_count() or 2) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            v, s = todo.pop(0)
            at = [str(a) for a in args.at]
            cmd = [sys.executable, __file__, "--one", v, str(s), "--iters", str(args.iters), "--at", *at]
            cmd += ["--out", str(args.out)]
            log = run_dir(args.out, v, s).with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:  # the child's progress bar and messages
                running.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=f), v, s, time.perf_counter()))
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, v, s, t0 = job
            if proc.returncode:
                sys.exit(f"{v}, seed {s}: failed (exit {proc.returncode}); see {run_dir(args.out, v, s)}.log")
            print(f"{v}, seed {s}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(collect(args.out, args.results), args.variants, args.seeds, args.at))


if __name__ == "__main__":
    main()
