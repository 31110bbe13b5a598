"""The course's plan on this machine: the training runs of notebooks 03-06, what an iteration of each kind costs
here (timed before notebook 01), and, with a budget (`course --minutes`), their iterations scaled to fit it, never
below the profile's floor (`Course.min_iters`), where a model would not yet make brain-shaped volumes.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from alphagan import config
from alphagan.config import make_config
from alphagan.course.settings import Profile, TrainingRun
from alphagan.data.dataset import Batches
from alphagan.device import GRAPH_WARMUP, Graphed, fastest_kernels, pick_device, pick_dtype, synchronise, use_graphs
from alphagan.models import build_networks
from alphagan.progress import tqdm
from alphagan.steps import UPDATES, iteration, optimisers, update_steps


@dataclass
class Plan:
    """What the course will train, per notebook, what an iteration of each kind costs on this machine, and what
    each notebook's other work (cohorts, evaluation, figures, its kernel) is predicted to take here."""

    profile: str
    runs: dict[str, list[TrainingRun]]
    seconds: dict[tuple[str, int, bool], float] = field(default_factory=dict)  # TrainingRun.kind -> s per iteration
    other: dict[str, float | None] = field(default_factory=dict)  # notebook -> seconds besides training; None: unknown

    def minutes(self, notebook: str) -> float:
        """Training minutes of one notebook here."""
        return sum(r.iters * self.seconds[r.kind] for r in self.runs.get(notebook, [])) / 60

    def predicted(self, notebook: str) -> float | None:
        """The whole notebook's minutes here, training and the rest; None where the rest was never measured."""
        other = self.other.get(notebook)
        return None if other is None else self.minutes(notebook) + other / 60

    def iters(self, notebook: str) -> int | None:
        """The iterations of a notebook's training runs (one number per notebook), None if it trains nothing."""
        runs = self.runs.get(notebook)
        return runs[0].iters if runs else None

    def parameters(self, notebook: str) -> dict[str, int]:
        """What the runner passes to a notebook's `parameters` cell."""
        iters = self.iters(notebook)
        return {} if iters is None else {"iters": iters, **({"compare_iters": iters} if notebook == "03" else {})}

    def table(self) -> str:
        """The plan as a Markdown table: per notebook its training and its predicted minutes in all."""
        head = "| notebook | training runs | iterations each | training minutes | predicted minutes in all |"
        lines = [head, "|---|---:|---:|---:|---:|"]
        notebooks = sorted({*self.runs, *self.other})
        for notebook in notebooks:
            runs = self.runs.get(notebook, [])
            models = f" ({', '.join(sorted({r.label for r in runs}))})" if runs else ""
            lines.append(
                f"| {notebook} | {len(runs)}{models} | {self.iters(notebook) or ''} | {self.minutes(notebook):.1f} | "
                f"{_shown(self.predicted(notebook))} |"
            )
        predicted = [self.predicted(n) for n in notebooks]
        total = None if None in predicted else sum(predicted)
        training = sum(self.minutes(n) for n in notebooks)
        runs = sum(map(len, self.runs.values()))
        return "\n".join([*lines, f"| all | {runs} | | {training:.1f} | {_shown(total)} |"])


def _shown(minutes: float | None) -> str:
    return "not measured at this profile" if minutes is None else f"{minutes:.1f}"


# What each notebook does besides training (making cohorts, preprocessing, evaluation, figures, starting its
# kernel), in multiples of `probe_seconds()`, so that the plan predicts it on any machine from one probe.
# Measured by `python bench/plan_accuracy.py` (bench/README.md); a notebook not listed was not measured at that
# profile, and the plan predicts its training only.
OTHER_WORK: dict[str, dict[str, float]] = {
    # A fresh machine: the synthetic cohorts are made in the course (a second run reuses them and is quicker).
    "smoke": {"01": 3.32, "02": 1.28, "03": 3.89, "04": 3.95, "05": 3.98, "06": 3.74},
    "cpu": {"01": 5.31, "02": 1.44},
}


def probe_seconds() -> float:
    """Seconds this machine takes for the kind of work every notebook does besides training, in small: a fresh
    Python that imports what the notebooks import, filters a volume and saves a figure (5-7 s on the 2-core
    Xeon that measured `OTHER_WORK`)."""
    code = (
        "import io, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt, nilearn.plotting; "
        "import numpy as np, scipy.ndimage as nd; import alphagan.evaluate, alphagan.viz; "
        "nd.gaussian_filter(np.random.default_rng(0).random((96, 96, 96)), 2); "
        "fig = plt.figure(); plt.imshow(np.zeros((64, 64))); fig.savefig(io.BytesIO())"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


class TimedStep:
    """One training iteration of `cfg`, built as `train()` builds it (the same updates, fused Adam, CUDA graphs
    where `train()` uses them), on random volumes: what the plan times, and `bench/roofline.py` measures."""

    def __init__(self, cfg: config.Config):
        self.cfg = cfg
        self.device = device = pick_device(cfg.device)
        fastest_kernels(device)  # as train() runs
        self.dtype = dtype = pick_dtype(cfg.precision, device)
        nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
        nets = {k: v.to(device) for k, v in nets.items()}
        volumes = np.random.default_rng(0).uniform(-1, 1, (2 * cfg.batch, *[cfg.size] * 3)).astype(np.float32)
        self.batches = Batches(volumes, device, torch.Generator(device=device).manual_seed(0))
        self.graphs = use_graphs(cfg, device, distributed=False, amp_dtype=dtype)
        opts, self.inputs = optimisers(nets, UPDATES[cfg.model], cfg, fused=True, capturable=self.graphs), {}
        self.steps = update_steps(nets, opts, self.inputs, cfg, dtype)
        self.step = Graphed(self.steps, self.graphs)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def warm_up(self) -> None:
        """What `train()` also pays once: cuDNN's autotuning and, on a GPU, each update's graph capture."""
        self.run(GRAPH_WARMUP + 2 if self.cuda else 1)

    def run(self, n: int, graphed: bool = True) -> float:
        """Seconds per iteration over `n` iterations (eager, without CUDA graphs, when not `graphed`)."""
        step, static = (self.step, self.graphs) if graphed else (Graphed(self.steps), False)
        synchronise(self.device)
        start = time.perf_counter()
        for _ in range(n):
            iteration(UPDATES[self.cfg.model], step, self.inputs, self.batches, self.cfg, static=static)
        synchronise(self.device)
        return (time.perf_counter() - start) / n


def seconds_per_iteration(profile: str, model: str, latent: int, as_written: bool = False) -> float:
    """Seconds of one training iteration of `model` at `profile`'s settings (`as_written`: without LEARNS) on this
    machine (`TimedStep`), after its warm-up. On a GPU more iterations are timed, since one takes milliseconds."""
    cfg = make_config(profile, model, latent=latent)
    step = TimedStep(config.as_written(cfg) if as_written else cfg)
    step.warm_up()
    return step.run(20 if step.cuda else 2)


def plan_course(profile: str, minutes: float | None = None, only: list[str] | None = None) -> Plan:
    """Time each kind of training run of the course at `profile` here, and predict the rest of each notebook in
    `only` (default: all six) from `probe_seconds`; with `minutes`, scale every notebook's iterations so that
    training fits them. Raises ValueError when that falls below the profile's floor."""
    notebooks = only or [f"{i:02d}" for i in range(1, 7)]
    whole = Profile.of(profile)
    runs = {nb: r for nb, r in whole.runs().items() if nb in notebooks}
    units = OTHER_WORK.get(profile, {})
    probe = probe_seconds() if units.keys() & set(notebooks) else 0.0  # a fresh Python: only when it is used
    other = {nb: units[nb] * probe if nb in units else None for nb in notebooks}
    plan = Plan(profile, runs, other=other)
    kinds = sorted({r.kind for rs in runs.values() for r in rs})
    # A bar: at the paper's size on a CPU (the gpu profile on a laptop) one kind takes minutes to time.
    for kind in tqdm(kinds, desc="course: timing each kind of model here", unit="model", file=sys.stdout):
        plan.seconds[kind] = seconds_per_iteration(profile, *kind)
    planned = sum(plan.minutes(nb) for nb in runs)
    if minutes is None or planned <= 0:
        return plan
    scale = minutes / planned
    iters = {nb: max(1, int(rs[0].iters * scale)) for nb, rs in runs.items()}
    floor = whole.course.min_iters
    short = [nb for nb, rs in runs.items() if rs[0].from_scratch and iters[nb] < floor]
    if short:
        needed = math.ceil(max(floor / rs[0].iters for nb, rs in runs.items() if nb in short) * planned)
        raise ValueError(
            f"--minutes {minutes:g} gives notebook {short[0]}'s models {iters[short[0]]} iterations on this machine, "
            f"below the {profile} profile's floor of {floor} (fewer do not make brain-shaped volumes); give "
            f"--minutes {needed} or more, or a smaller profile"
        )
    scaled = whole.runs(iters)
    return Plan(profile, {nb: scaled[nb] for nb in runs}, plan.seconds, other)
