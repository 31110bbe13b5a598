"""The course runner: plan the run on this machine, execute the notebooks in order with papermill into one run
folder, then summarise.

Before the first notebook the runner times a few iterations of each model it will train, at the profile's
settings, and prints a plan: the training runs of notebooks 03-06, their iterations and the minutes they take
here (`plan_course`). With a budget (`--minutes`) it scales every notebook's iterations to fit, and refuses
below the profile's floor (`Course.min_iters`), where a model would not yet make brain-shaped volumes.

Each notebook gets `profile`, `run_dir` and its iterations through its `parameters` cell and writes what it
makes (figures, NIfTI files, metrics) under `run_dir`; the executed notebooks land there too. A failing notebook
stops the run with the notebook's name and the cell that failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alphagan.progress import SAVED_RUN

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_03_run(run_dir: str | Path) -> Path:
    """Notebook 03's training run, seen from the `run_dir` of a later notebook of the same course run (the course
    runner gives every notebook a folder of one run folder; run alone, the notebooks default to runs/NN_name)."""
    return Path(run_dir).parent / "03_training" / "run"


def notebook_03_model(run_dir: str | Path) -> Path:
    """The checkpoint folder of notebook 03's model, which notebooks 05 and 06 start from at the `cpu` profile."""
    folder = notebook_03_run(run_dir) / "checkpoints"
    if not any(folder.glob("ckpt_*.pt")):
        raise FileNotFoundError(
            f"{folder}: no checkpoint of notebook 03; run notebook 03 first, or set warm_start = False (then raise "
            f"iters: from random weights a model needs about 1000 iterations to make brain-shaped volumes at 32³)"
        )
    return folder


@dataclass(frozen=True)
class TrainingRun:
    """One training run a notebook makes: the model and latent size (what an iteration costs), its iterations,
    and whether it starts from random weights (then the profile's floor applies) or fine-tunes notebook 03's."""

    model: str
    latent: int
    iters: int
    from_scratch: bool = True


@dataclass
class Plan:
    """What the course will train, per notebook, and what an iteration of each kind costs on this machine."""

    profile: str
    runs: dict[str, list[TrainingRun]]
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # (model, latent) -> s per iteration

    def minutes(self, notebook: str) -> float:
        """Training minutes of one notebook here (synthesis and evaluation come on top)."""
        return sum(r.iters * self.seconds[(r.model, r.latent)] for r in self.runs.get(notebook, [])) / 60

    def iters(self, notebook: str) -> int | None:
        """The iterations of a notebook's training runs (one number per notebook), None if it trains nothing."""
        runs = self.runs.get(notebook)
        return runs[0].iters if runs else None

    def parameters(self, notebook: str) -> dict[str, int]:
        """What the runner passes to a notebook's `parameters` cell."""
        iters = self.iters(notebook)
        return {} if iters is None else {"iters": iters, **({"compare_iters": iters} if notebook == "03" else {})}

    def table(self) -> str:
        lines = ["| notebook | training runs | iterations each | training minutes here |", "|---|---:|---:|---:|"]
        for notebook, runs in self.runs.items():
            models = ", ".join(sorted({r.model if r.latent == 1000 else f"{r.model} z{r.latent}" for r in runs}))
            lines.append(f"| {notebook} | {len(runs)} ({models}) | {runs[0].iters} | {self.minutes(notebook):.1f} |")
        total = sum(self.minutes(n) for n in self.runs)
        return "\n".join([*lines, f"| all | {sum(map(len, self.runs.values()))} | | {total:.1f} |"])


def training_runs(profile: str, iters: dict[str, int] | None = None) -> dict[str, list[TrainingRun]]:
    """The training runs of notebooks 03-06 at `profile` (`iters`: a notebook's iterations instead of the
    profile's), as the notebooks make them."""
    from alphagan.config import course_settings, make_config

    course, cfg = course_settings(profile), make_config(profile)
    own = iters or {}
    it = {nb: own.get(nb, default) for nb, default in (("03", cfg.iters), ("04", cfg.iters),
          ("05", course.diseased_iters or cfg.iters), ("06", course.aug_iters or cfg.iters))}  # fmt: skip
    scratch = not course.warm_start
    runs = {"03": [TrainingRun("alpha-wgan-gp", cfg.latent, it["03"])] * 2}  # this run and the paper as written
    others = [TrainingRun(m, cfg.latent, it["04"]) for m in course.eval_models if m != "alpha-wgan-gp"]
    latents = [TrainingRun("alpha-wgan-gp", z, it["04"]) for z in course.latents if z != cfg.latent]
    if others or latents:
        runs["04"] = others + latents
    runs["05"] = [TrainingRun("alpha-wgan-gp", cfg.latent, it["05"], scratch)] * len(course.diseased_cohorts)
    runs["06"] = [TrainingRun("alpha-wgan-gp", cfg.latent, it["06"], scratch)] * 2  # one generator per class
    return runs


def seconds_per_iteration(profile: str, model: str, latent: int, warmup: int = 1, timed: int = 2) -> float:
    """Seconds of one training iteration of `model` at `profile`'s settings on this machine, timed on random
    volumes with the update `train()` runs (after `warmup` untimed iterations)."""
    import numpy as np
    import torch

    from alphagan.config import make_config
    from alphagan.data.dataset import Cohort
    from alphagan.models import build_networks
    from alphagan.steps import UPDATES, draw, optimisers, run_update
    from alphagan.train import pick_device, pick_dtype

    cfg = make_config(profile, model, latent=latent)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.precision, device)
    nets = {k: v.to(device) for k, v in build_networks(model, cfg.size, cfg.width, latent, cfg.code_hidden,
                                                       cfg.critic_norm).items()}  # fmt: skip
    volumes = np.random.default_rng(0).uniform(-1, 1, (2 * cfg.batch, *[cfg.size] * 3)).astype(np.float32)
    cohort = Cohort(volumes, device, torch.Generator(device=device).manual_seed(0))
    updates = UPDATES[model]
    opts, inputs = optimisers(nets, updates, cfg, fused=True), {}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def iteration() -> None:
        for u in updates:
            for _ in range(u.times(cfg)):
                draw(u.draws, inputs, cohort, cfg)
                run_update(u, nets, opts[u.name], inputs, cfg, autocast=autocast)

    for _ in range(warmup):
        iteration()
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronise()
    start = time.perf_counter()
    for _ in range(timed):
        iteration()
    synchronise()
    return (time.perf_counter() - start) / timed


def plan_course(profile: str, minutes: float | None = None, only: list[str] | None = None) -> Plan:
    """Time each kind of training run of the course at `profile` here; with `minutes`, scale every notebook's
    iterations so that training fits them. Raises ValueError when that falls below the profile's floor."""
    from alphagan.config import course_settings

    runs = {nb: r for nb, r in training_runs(profile).items() if only is None or nb in only}
    plan = Plan(profile, runs)
    for kind in sorted({(r.model, r.latent) for rs in runs.values() for r in rs}):
        plan.seconds[kind] = seconds_per_iteration(profile, *kind)
    planned = sum(plan.minutes(nb) for nb in runs)
    if minutes is None or planned <= 0:
        return plan
    scale = minutes / planned
    iters = {nb: max(1, int(rs[0].iters * scale)) for nb, rs in runs.items()}
    floor = course_settings(profile).min_iters
    short = [nb for nb, rs in runs.items() if rs[0].from_scratch and iters[nb] < floor]
    if short:
        needed = math.ceil(max(floor / rs[0].iters for nb, rs in runs.items() if nb in short) * planned)
        raise ValueError(
            f"--minutes {minutes:g} gives notebook {short[0]}'s models {iters[short[0]]} iterations on this machine, "
            f"below the {profile} profile's floor of {floor} (fewer do not make brain-shaped volumes); give "
            f"--minutes {needed} or more, or a smaller profile"
        )
    scaled = training_runs(profile, iters)
    return Plan(profile, {nb: scaled[nb] for nb in runs}, plan.seconds)


def notebooks(only: str | None = None, directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in order, or those whose number is in the comma-separated `only`."""
    found = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks in {directory}: run the course from a clone of the repository")
    if only:
        wanted = {w.strip().zfill(2) for w in only.split(",") if w.strip()}
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise ValueError(f"--only: no notebook numbered {sorted(unknown)}; there are {[p.name[:2] for p in found]}")
        found = [p for p in found if p.name[:2] in wanted]
        if not found:
            raise ValueError(f"--only {only!r} names no notebook; give numbers such as 01,03")
    return found


def _failed_cell(executed: Path) -> str:
    """Where an executed notebook stopped: the first cell with an error output."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):
        return "unknown cell"
    # Numbered as in the source notebook, from 1: the cells papermill adds (the injected parameters, the error
    # banner at the top) are not counted.
    added = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [c for c in nb.get("cells", []) if not added & set(c.get("metadata", {}).get("tags", []))]
    for number, cell in enumerate(cells, 1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first = "".join(cell.get("source", "")).strip().splitlines()[:1]
                where = first[0][:60] if first else "empty"
                return f"cell {number} ({where}): {output.get('ename')}: {output.get('evalue')}"
    return "unknown cell"


# What a figure shows, by file name (stem, or its start for one figure per cohort).
# Keyed by the figure's path in a notebook's folder, without ".png"; "views-KIND-CONTRAST" and the like match
# their prefix, and the rest is added in brackets.
CAPTIONS = {
    "01_data/cohort_factors": "the synthetic cohort's ages, and brain, ventricle and grey-matter volumes against age",
    "01_data/young_old": "the three youngest and the three oldest subjects",
    "01_data/lesion": "a synthetic lesion, cut through its centre",
    "01_data/preprocessing_steps": "one subject through the preprocessing: RAS, trimmed, padded and resized, stretched",
    "01_data/augmentation": "one training volume and five augmented draws of it (flip, intensity)",
    "01_data/prepared": "prepared training volumes in three planes",
    "02_architecture/checkerboard": "transposed convolution against resize-convolution on the same input",
    "02_architecture/codes": "codes of an untrained encoder against N(0, I)",
    "02_architecture/untrained_sample": "an untrained generator's output",
    "03_training/loss_curves": "every loss term through training",
    "03_training/samples": "samples from random codes, generator with recalibrated statistics",
    "03_training/as_written": "spread of samples and reconstructions: the paper as written against this run",
    "pca": "real and generated volumes on the first two principal components of the real set",
    "volumes": "tissue volumes, real against generated",
    "nearest": "generated volumes beside their nearest training volumes",
    "05_diseased/views": "a real volume and generated ones, colour-mapped like the paper's Fig. 4",
    "05_diseased/lesions": "lesion sizes and centres, real against generated",
    "06_augmentation/classes": "real and generated volumes of each class",
    "06_augmentation/augmentation": "held-out accuracy, real subjects only against real plus generated",
}


def _caption(figure: Path, notebook: str) -> str:
    """The caption of `figure`, saved by `notebook` (its folder's name); evaluate's figures by their own name."""
    for key in (f"{notebook}/{figure.stem}", figure.stem):
        for known, caption in CAPTIONS.items():
            if key == known or key.startswith(f"{known}-") or key.startswith(f"{known}_"):
                detail = key[len(known) + 1 :].replace("_", " ").replace("-", " ")
                return caption + (f" ({detail})" if detail else "")
    return figure.stem.replace("_", " ")


def _number(value) -> str:
    from alphagan.evaluate import plain

    return plain(value) if isinstance(value, float) else str(value)


def _numbers(path: Path) -> list[str]:
    """A JSON file of numbers as a two- or three-column table (one level of nesting flattened)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return [f"`{path.name}`: {data}", ""]
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += [f"| {key} | {k} | {_number(v)} |" for k, v in value.items()]
        elif isinstance(value, list):
            rows.append(f"| {key} | | {', '.join(_number(v) for v in value)} |")
        else:
            rows.append(f"| {key} | | {_number(value)} |")
    return [f"Numbers (`{path.name}`):", "", "| quantity | | value |", "|---|---|---|", *rows, ""]


def _summary(run_dir: Path, timings: list[tuple[str, float]], profile: str, plan: Plan) -> Path:
    """A page a learner can read after a run: each notebook's time, the training iterations it used, then per
    notebook its numbers, its tables (Table 1 before the latent-size table; the paper's table once) and its
    figures with captions."""
    lines = [f"# Course run, profile `{profile}`", "", "| notebook | minutes | training iterations per model |"]
    lines.append("|---|---|---|")
    for name, seconds in timings:
        iters = plan.iters(name[:2])
        lines.append(f"| {name} | {seconds / 60:.1f} | {'' if iters is None else iters} |")
    paper_shown = False
    for name, _ in timings:
        stem = Path(name).stem
        folder = run_dir / stem
        lines += ["", f"## {stem}", ""]
        for key_file in sorted(folder.glob("*.json")):
            lines += _numbers(key_file)
        tables = sorted([*folder.glob("*.md"), *folder.glob("*/table.md")], key=lambda t: t.parent.name != "table1")
        for table in tables:
            text = table.read_text().strip()
            mark = "The paper's Table 1"
            if mark in text:
                text = text if not paper_shown else text[: text.index(mark)].strip()
                paper_shown = True
            title = "Table 1" if table.parent.name == "table1" else f"`{table.relative_to(run_dir)}`"
            lines += [f"**{title}**", "", text, ""]
        evaluated = [*sorted(folder.glob("table1/*.png")), *sorted(folder.glob("latent/*.png"))]
        for figure in [*sorted(folder.glob("*.png")), *evaluated]:
            where = figure.relative_to(run_dir)
            lines += [f"![{where}]({where})", "", f"*{_caption(figure, folder.name)}* (`{where}`)", ""]
    path = run_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_course(
    profile: str | None = None,
    only: str | None = None,
    out: str | Path | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    minutes: float | None = None,
) -> int:
    """Plan, then run the notebooks; 0 when all ran, 1 with a message naming the notebook and cell otherwise.
    `minutes`: the training budget the notebooks' iterations are scaled to (see `plan_course`)."""
    import papermill

    from alphagan.config import default_profile

    profile = profile or default_profile()
    selected = notebooks(only, notebook_dir)  # checked before anything is created
    print(f"course: timing a few iterations of each model at profile {profile} on this machine", flush=True)
    plan = plan_course(profile, minutes, only=[nb.name[:2] for nb in selected])
    budget = f" scaled to {minutes:g} training minutes" if minutes else ""
    print(f"course plan{budget}:\n{plan.table()}", flush=True)
    run_dir = Path(out) if out else Path("runs") / f"course-{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    os.environ[SAVED_RUN] = "1"  # the kernels inherit it: text progress bars and static figures, saved as they end
    print(f"course: profile {profile}, {len(selected)} notebooks, run folder {run_dir}", flush=True)
    timings: list[tuple[str, float]] = []
    for i, notebook in enumerate(selected, 1):
        executed = run_dir / notebook.name
        print(f"[{i}/{len(selected)}] {notebook.name}", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(executed),
                cwd=str(notebook.parent),
                # Cell i/N, elapsed time and an estimate, so that a long notebook does not look hung.
                progress_bar={"desc": f"{notebook.stem} cells", "unit": "cell", "file": sys.stderr},
                parameters={
                    "profile": profile,
                    "run_dir": str(run_dir / notebook.stem),
                    **(plan.parameters(notebook.name[:2]) if minutes else {}),
                },
                # The kernel talks to us on 127.0.0.1 only; its start-up warning about unencrypted TCP is noise
                # here, and errors still reach the executed notebook and this runner.
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        except Exception as exc:  # papermill raises PapermillExecutionError, kernels may die otherwise
            print(f"[{i}/{len(selected)}] {notebook.name} FAILED", flush=True)
            print(
                f"course: {notebook.name} failed at {_failed_cell(executed)}\n"
                f"  executed notebook: {executed}\n  {type(exc).__name__}",
                file=sys.stderr,
            )
            return 1
        seconds = time.perf_counter() - start
        timings.append((notebook.name, seconds))
        print(f"[{i}/{len(selected)}] {notebook.name} done in {seconds / 60:.1f} min", flush=True)
    summary = _summary(run_dir, timings, profile, plan)
    print(f"course: all {len(selected)} notebooks ran; summary: {summary}")
    return 0
