"""The training loop of the 3D alpha-WGAN-GP and its baselines, top to bottom (taught in notebook 03).

One iteration runs the model's updates in the paper's order (`alphagan.steps.UPDATES`):
  1. encoder + generator, `g_steps` times (two real updates by default: a fresh batch and fresh noise each),
  2. discriminator, `d_steps` times (1; 5 for WGAN-GP),
  3. code discriminator (alpha-GANs only).
While one network is updated the others are frozen (requires_grad off), so no step leaves gradients behind
in a network it must not change.

On a GPU the loop never waits for the host: the cohort lives on the GPU and is indexed and augmented there,
every random number comes from one generator on the GPU, a loss that turns NaN is noticed on the device and
read at log steps and before each checkpoint, and each update is replayed as a CUDA graph (`cuda_graphs`).

Run it with `python -m alphagan train ...`, or for several GPUs `torchrun --nproc_per_node=K -m alphagan train ...`
(DistributedDataParallel: each process draws its own batches and gradients are averaged. BatchNorm normalises
with each process's own batch statistics, like single-GPU training at the same per-GPU batch; SyncBatchNorm
would change the statistics the paper's batch of 4 gives. The running statistics, which each process updates
from its own data, are averaged over the processes before every checkpoint and at the end, so that all ranks
hold identical networks and the saved statistics have seen every process's data.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from alphagan import metrics
from alphagan.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, load_newest, save_checkpoint
from alphagan.config import Config
from alphagan.data.dataset import Batches, Source, data_digest, load_training_volumes
from alphagan.device import pick_device, pick_dtype
from alphagan.folders import FolderRefused, atomic, claim, owner_record
from alphagan.losses import Terms
from alphagan.models import build_networks
from alphagan.sampling import calibrated_generator, generate, reconstruct, save_nifti
from alphagan.steps import UPDATES, Inputs, Update, iteration, optimisers, update_steps

# Settings that must not change when a run is resumed (iterations, logging and device may).
RUN_DEFINING = (
    "model",
    "size",
    "width",
    "latent",
    "code_hidden",
    "batch",
    "lr",
    "betas",
    "lambda_gp",
    "lambda_rec",
    "critic_norm",
    "beta_kl",
    "g_steps",
    "d_steps",
    "n_subjects",
    "flip",
    "intensity",
    "seed",
    "precision",
)
GRAPH_WARMUP = 3  # eager runs of each update before its capture (cuDNN autotuning, Adam's state)


@dataclass
class TrainResult:
    """What a run leaves: its folder, the trained networks (plain modules, on their device) and settings."""

    out: Path
    nets: dict[str, nn.Module]
    config: Config
    fov_mm: float


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


class FiniteWatch:
    """Notices a non-finite loss term on the device, without stopping the host; `check` reads it (a sync).

    Called after each update with its terms, it records on the device the index of the first update whose terms
    were not all finite and those terms' values, so the message can name the term and the iteration even when it
    is read many steps later."""

    def __init__(self, device: torch.device, updates_per_iteration: int, start: int):
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.snapshots: dict[str, tuple[list[str], torch.Tensor]] = {}
        self.per_iteration, self.start = updates_per_iteration, start

    def __call__(self, name: str, terms: Terms) -> None:
        values = torch.stack([t.detach().float() for t in terms.values()])
        fresh = (self.first < 0) & ~torch.isfinite(values).all()
        self.first.copy_(torch.where(fresh, self.count, self.first))
        if name not in self.snapshots:
            self.snapshots[name] = (list(terms), torch.zeros_like(values))
        snapshot = self.snapshots[name][1]
        snapshot.copy_(torch.where(fresh, values, snapshot))
        self.count += 1

    def check(self, ckpt_dir: Path) -> None:
        first = int(self.first)
        if first < 0:
            return
        last_checkpoint = (list_checkpoints(ckpt_dir) or [None])[-1]
        bad = [
            f"{k} = {v}"
            for keys, values in self.snapshots.values()
            for k, v in zip(keys, values.tolist())
            if not math.isfinite(v)
        ]
        where = f"the last checkpoint, {last_checkpoint.name}, is intact" if last_checkpoint else "no checkpoint yet"
        raise TrainingDiverged(
            f"{', '.join(bad)} at iteration {self.start + first // self.per_iteration + 1}; the run stopped "
            f"before writing another checkpoint and {where} (lower the learning rate or try --precision fp32)"
        )


class Graphed:
    """Runs each update eagerly, or with `graphs` `GRAPH_WARMUP` times eagerly on a side stream, then captured
    once as a CUDA graph and replayed. Replaying launches the update's hundreds of kernels in one call; the
    inputs are read from the same tensors every time, which `draw(..., static=True)` refills."""

    def __init__(self, steps: dict[str, Callable[[], Terms]], graphs: bool = False):
        self.steps, self.graphs = steps, graphs
        self.calls = dict.fromkeys(steps, 0)
        self.captured: dict[str, tuple[torch.cuda.CUDAGraph, Terms]] = {}

    def __call__(self, update: Update) -> Terms:
        name = update.name
        if not self.graphs:
            return self.steps[name]()
        if name not in self.captured and self.calls[name] < GRAPH_WARMUP:
            self.calls[name] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                terms = self.steps[name]()
            torch.cuda.current_stream().wait_stream(side)
            return terms
        if name not in self.captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                terms = self.steps[name]()
            self.captured[name] = (graph, terms)
        graph, terms = self.captured[name]
        graph.replay()
        return terms


def use_graphs(cfg: Config, device: torch.device, distributed: bool, amp_dtype: torch.dtype) -> bool:
    """CUDA graphs where they are safe: one CUDA process, no compile, no fp16 loss scaling (host-side state)."""
    single_cuda = device.type == "cuda" and not distributed
    return cfg.cuda_graphs and single_cuda and not cfg.compile and amp_dtype != torch.float16


def _all_finite(nets: dict[str, nn.Module]) -> bool:
    """Every weight and statistic finite, read with one sync."""
    tensors = [t for net in nets.values() for t in net.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


RUN_FILES = ["config.json", "metrics.jsonl", "checkpoints", "samples"]


def _check_resume_data(out: Path, data: str) -> None:
    """A resumed run continues on the data it was trained on: the same source, and for a cache the same contents
    (the digest of its manifest), not a cache prepared again under the same name."""
    config = out / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    if saved.get("data") not in (None, data):
        raise ValueError(
            f"{config}: this run trained on {saved['data']}, not {data}; resume with --data {saved['data']}"
        )
    if saved.get("data_digest") not in (None, data_digest(data)):
        raise ValueError(
            f"{data}: prepared again since this run started (its manifest.tsv differs from the one {config} "
            f"records); resume on the cache it trained on, or train into a new --out"
        )


def _check_something_to_resume(out: Path, resume: bool, overwrite: bool) -> None:
    """A run stopped before its first checkpoint has nothing to continue: say so, and what does work."""
    record = owner_record(out) if out.is_dir() else None
    if record is None or record["command"] != "train" or list_checkpoints(out / "checkpoints") or overwrite:
        return
    if resume or (out / "config.json").exists():
        raise FolderRefused(
            f"{out}: holds a run that stopped before its first checkpoint, so there is nothing to resume; add "
            f"--overwrite to start it again, or choose another --out"
        )


def _claim_run_folder(out: Path, cfg: Config, data: str, resume: bool, overwrite: bool, init: str | Path | None):
    """The run folder, locked for this run (`alphagan.folders.claim`): a new run needs a folder that is new, empty
    or, with `overwrite`, an earlier run's (only its files are deleted, never those `init` or `data` point into).
    Rank 0 holds it for all processes of a DDP run."""
    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    if resume:
        _check_resume_data(out, data)
    _check_something_to_resume(out, resume, overwrite)
    keep = {"--init": init, "--data": Source.parse(data).cache}
    settings = {"model": cfg.model, "data": data}
    return claim(out, "train", settings, RUN_FILES, resume=resume, overwrite=overwrite, again=False, keep=keep)


NETWORK_DEFINING = ("model", "size", "width", "latent", "code_hidden", "critic_norm")


def _init_of(run: Path) -> str | None:
    """The checkpoint a run's networks started from (`train(init=...)`), as its config.json records it."""
    config = run / "config.json"
    return json.loads(config.read_text()).get("init") if config.exists() else None


def _differing(saved: Config, cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """The settings among `keys` in which a checkpoint's config differs from this run's."""
    return [k for k in keys if getattr(saved, k) != getattr(cfg, k)]


def _load_init(init: str | Path, cfg: Config, nets) -> Path:
    """Load the network weights of checkpoint `init` (a file or a folder: its newest) into `nets`; returns the
    checkpoint's absolute path. Its networks must have the shapes of `cfg`'s."""
    path = find_checkpoint(init).resolve()
    state = load_checkpoint(path)
    saved = Config.from_dict(state["config"])
    changed = [f"{k} {getattr(saved, k)} != {getattr(cfg, k)}" for k in _differing(saved, cfg, NETWORK_DEFINING)]
    if changed:
        raise ValueError(f"{path}: its networks differ from this run's ({', '.join(changed)}); cannot start from it")
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    return path


@dataclass
class Run:
    """What a training run holds while it runs: where it writes, its device and processes, its networks and
    optimisers, its batches (which own the run's random generator), and where it started."""

    cfg: Config
    out: Path
    data: str
    device: torch.device
    rank: int
    world: int
    nets: dict[str, nn.Module]  # the plain modules: frozen, no_grad and checkpoints use these
    train_nets: dict[str, nn.Module]  # what a learning network is called as (DDP- or compile-wrapped)
    opts: dict[str, torch.optim.Optimizer]
    batches: Batches
    fov_mm: float
    start: int
    fixed_z: torch.Tensor  # the same noise and real volumes in every progress picture
    fixed_x: torch.Tensor
    inputs: Inputs = field(default_factory=dict)  # what the updates draw, shared between them
    watch: FiniteWatch | None = None
    bar: Any = None  # the progress bar, which shows the last losses
    since: tuple[float, int] = (0.0, 0)  # clock and iteration of the last log record

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def _processes(cfg: Config) -> tuple[torch.device, int, int]:
    """Device, rank and world size: one process, or one per GPU under torchrun (DDP)."""
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def _wrap(nets: dict[str, nn.Module], cfg: Config, device: torch.device, world: int) -> dict[str, nn.Module]:
    """The networks as a learning update calls them: DDP-wrapped across processes, E and G compiled on request.
    Frozen networks are called plain, so DDP only ever waits for gradients of the network being updated."""
    wrapped = dict(nets)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = {k: DDP(v, device_ids=ids, broadcast_buffers=False) for k, v in nets.items()}
    if cfg.compile:
        # Only the generator side: the critics' gradient penalty differentiates twice (create_graph=True), which
        # torch.compile's autograd does not support (measured: "does not currently support double backward").
        wrapped = {k: torch.compile(v) if k in ("E", "G") else v for k, v in wrapped.items()}
    return wrapped


def _restore(state: dict, run: Run, path: Path) -> int:
    """Load a checkpoint's networks, optimisers and random states into `run`; returns its iteration."""
    cfg = run.cfg
    saved = Config.from_dict(state["config"])
    changed = _differing(saved, cfg, RUN_DEFINING)
    if changed:
        raise ValueError(
            f"{path}: saved with different {', '.join(changed)} "
            f"({', '.join(f'{getattr(saved, k)} != {getattr(cfg, k)}' for k in changed)}); resume with the "
            f"run's own settings (its config.json) or train into a new --out"
        )
    if state["iter"] > cfg.iters:
        raise ValueError(f"{path}: the run is at iteration {state['iter']}, beyond --iters {cfg.iters}")
    for k, net in run.nets.items():
        net.load_state_dict(state["nets"][k])
    for k, opt in run.opts.items():
        opt.load_state_dict(state["optimisers"][k])
    rng = state["rng"][run.rank]
    try:
        run.batches.set_state(rng)
    except (RuntimeError, KeyError) as exc:  # saved on another kind of device: the draws cannot continue exactly
        raise ValueError(f"{path}: its random state is for another device; resume on the device that saved it") from exc
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    return int(state["iter"])


def _rng_state(run: Run) -> dict:
    state = {**run.batches.state(), "torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def _write_settings(run: Run, resume: bool, init: Path | None) -> None:
    """config.json (with the data and the starting checkpoint); on resume, the log cut back to the checkpoint."""
    started = str(init) if init is not None else _init_of(run.out) if resume else None
    settings = {**run.cfg.to_dict(), "data": run.data, "data_digest": data_digest(run.data), "fov_mm": run.fov_mm}
    settings.update({"init": started} if started else {})
    with atomic(run.out / "config.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2))
    log_path = run.out / "metrics.jsonl"
    if resume and log_path.exists():  # drop lines written after the checkpoint we resume from
        kept = [line for line in log_path.read_text().splitlines() if _logged_iteration(line) <= run.start]
        with atomic(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _logged_iteration(line: str) -> float:
    """The iteration of one line of metrics.jsonl; infinite for a line cut short by a stop (a full disk, a kill),
    which resuming then drops with the lines after its checkpoint."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _setup(cfg: Config, data: str, out: Path, resume: bool, init: str | Path | None, progress: bool) -> Run:
    """Device and processes, the batches, the networks and their optimisers, and the state to start from."""
    device, rank, world = _processes(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format

    # Batches, augmentation, noise and penalty weights all come from one generator per rank.
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    volumes, fov_mm = load_training_volumes(
        data, cfg.size, cfg.n_subjects, seed=cfg.seed, progress=progress and rank == 0
    )
    if len(volumes) < cfg.batch:
        raise ValueError(f"{data}: {len(volumes)} volumes, fewer than one batch of {cfg.batch}")
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    batches = Batches(volumes, device, rng, cfg.flip, cfg.intensity, memory_format)

    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    for net in nets.values():
        net.to(device, memory_format=memory_format)
    graphs = use_graphs(cfg, device, world > 1, pick_dtype(cfg.precision, device))
    # Fused Adam: one pass over each parameter instead of one per arithmetic step; on a CPU the latent-sized
    # layers (millions of weights, a few multiply-adds each) otherwise spend more time in Adam than in the model.
    opts = optimisers(nets, UPDATES[cfg.model], cfg, fused=True, capturable=graphs)
    fixed_z = torch.randn(cfg.n_fixed, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed + 1))
    run = Run(
        cfg, out, data, device, rank, world, nets, _wrap(nets, cfg, device, world), opts, batches, fov_mm, 0,
        fixed_z, batches.first(cfg.n_fixed),
    )  # fmt: skip
    start_weights = None
    if resume:
        path, state = load_newest(run.ckpt_dir, map_location=device)
        run.start = _restore(state, run, path)
    elif init is not None:
        start_weights = _load_init(init, cfg, nets)
    if run.master:
        _write_settings(run, resume, start_weights)
    return run


def _updates(run: Run) -> Graphed:
    """Each update of the model as one call of `steps.run_update`, chosen once before the loop."""
    cfg, device = run.cfg, run.device
    amp_dtype = pick_dtype(cfg.precision, device)
    run.watch = FiniteWatch(device, sum(u.times(cfg) for u in UPDATES[cfg.model]), run.start)
    steps = update_steps(run.nets, run.opts, run.inputs, cfg, amp_dtype, run.train_nets, run.watch)
    return Graphed(steps, use_graphs(cfg, device, run.distributed, amp_dtype))


def _picture(run: Run, it: int) -> dict[str, float]:
    """Save fixed-noise samples (G with recalibrated statistics) and reconstructions of fixed real volumes;
    return how much they differ from each other, relative to how much the fixed real volumes do
    (`metrics.spread`): near 0, every code gives one volume or every input one reconstruction."""
    from alphagan.viz import planes_columns, save_figure

    nets, cfg = run.nets, run.cfg
    G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    with torch.no_grad():
        samples = G(run.fixed_z.to(run.device)).float().cpu()
    groups, spread_of = {"samples": list(samples)}, {"sample_spread": samples}
    if "E" in nets:
        rec = reconstruct(nets["E"], nets["G"], run.fixed_x.to(run.device)).float().cpu()
        groups["real"], groups["reconstructions"] = list(run.fixed_x), list(rec)
        spread_of["rec_spread"] = rec
    save_figure(
        planes_columns(groups, title=f"{cfg.model}, iteration {it}"), run.out / "samples" / f"iter_{it:06d}.png", 80
    )
    real = metrics.spread(run.fixed_x)  # 0 with one fixed volume (n_fixed=1): no spread to compare with
    return {k: metrics.spread(v) / real for k, v in spread_of.items()} if real > 0 else {}


def _log(run: Run, done: int, terms: Terms, extra: dict[str, float]) -> None:
    """One line of metrics.jsonl: every loss term (one sync), the speed since the last line, GPU memory."""
    run.watch.check(run.ckpt_dir)
    values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
    record = {"iter": done, **{k: round(v, 6) for k, v in zip(terms, values)}}
    record.update({k: round(v, 6) for k, v in extra.items()})
    record["it_per_s"] = round((done - run.since[1]) / (time.perf_counter() - run.since[0]), 4)
    if run.device.type == "cuda":
        record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    run.since = (time.perf_counter(), done)
    shown = ("loss_d", "loss_eg", "loss_g", "w_dist", "l1")
    run.bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})


def _checkpoint(run: Run, it: int) -> None:
    """An atomic checkpoint of networks, optimisers and every random state (all ranks' under DDP)."""
    run.watch.check(run.ckpt_dir)
    own = _rng_state(run)
    rng_states = [own]
    if run.distributed:  # every rank's streams, so a resumed multi-GPU run continues each of them
        for net in run.nets.values():  # running statistics averaged over the ranks
            for buffer in net.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= run.world
        rng_states = [None] * run.world
        dist.all_gather_object(rng_states, own)
    if not _all_finite(run.nets):
        raise TrainingDiverged(f"a weight became NaN or infinite by iteration {it}; no checkpoint written")
    if run.master:
        state = {
            "config": run.cfg.to_dict(),
            "iter": it,
            "fov_mm": run.fov_mm,
            "nets": {k: v.state_dict() for k, v in run.nets.items()},
            "optimisers": {k: v.state_dict() for k, v in run.opts.items()},
            "rng": rng_states,
        }
        save_checkpoint(run.ckpt_dir, it, state, keep=run.cfg.keep_ckpts)


def _after_iteration(run: Run, done: int, terms: Terms) -> None:
    """Picture, log line and checkpoint, each when it is due."""
    cfg, last = run.cfg, done == run.cfg.iters
    picture = run.master and (done % cfg.sample_every == 0 or last)
    spreads = _picture(run, done) if picture else {}
    if run.master and (done % cfg.log_every == 0 or last or picture):
        _log(run, done, terms, spreads)
    if done % cfg.ckpt_every == 0 or last:
        _checkpoint(run, done)


def _sample_names(cfg: Config) -> list[str]:
    return [f"sample_{i:04d}.nii.gz" for i in range(cfg.n_fixed)]


def _final_samples_written(run: Run) -> bool:
    """Whether the finished run's samples are all there (a run killed after its last checkpoint has none)."""
    return all((run.out / "samples" / name).exists() for name in _sample_names(run.cfg))


def _final_samples(run: Run) -> None:
    """A few NIfTI samples of the finished run."""
    cfg = run.cfg
    G = calibrated_generator(run.nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    for name, volume in zip(_sample_names(cfg), generate(G, cfg.n_fixed, cfg.latent, seed=cfg.seed + 2)):
        save_nifti(volume, run.out / "samples" / name, run.fov_mm)


def train(
    cfg: Config,
    data: str,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    after_iteration: Callable[[int], None] | None = None,
    overwrite: bool = False,
    init: str | Path | None = None,
) -> TrainResult:
    """Train `cfg.model` on `data` (a cache folder or `synth[:kind[:contrast]]`), writing everything to `out`.

    `out` must not hold a run already, unless `resume` continues it or `overwrite` deletes it first (only the run's
    own files). `init` (a checkpoint file or a run's checkpoint folder) starts the networks from its weights
    instead of at random (fine-tuning; the optimisers and the iteration start afresh). `after_iteration(done)` is
    called after every iteration (a profiler's `step`, a notebook's own display)."""
    from alphagan.progress import tqdm
    from alphagan.viz import use_headless_backend

    cfg, out = cfg.validate(), Path(out)
    data = str(Source.parse(data))  # a cache as its absolute path: the run can be evaluated from anywhere
    use_headless_backend()
    with _claim_run_folder(out, cfg, data, resume, overwrite, init):
        run = _setup(cfg, data, out, resume, init, progress)
        update = _updates(run)

        run.bar = tqdm(range(run.start, cfg.iters), initial=run.start, total=cfg.iters, desc=cfg.model,
                       disable=not (progress and run.master))  # fmt: skip
        run.since = (time.perf_counter(), run.start)
        for it in run.bar:
            terms = iteration(UPDATES[cfg.model], update, run.inputs, run.batches, cfg, static=update.graphs)
            _after_iteration(run, it + 1, terms)
            if after_iteration is not None:
                after_iteration(it + 1)

        if run.master and (run.start < cfg.iters or not _final_samples_written(run)):
            _final_samples(run)
    if run.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, run.nets, cfg, run.fov_mm)


def finished_run(folder: str | Path, cfg: Config, data: str, init: str | Path | None = None) -> TrainResult | None:
    """The run in `folder`, loaded, if it finished `cfg` on `data` from `init`: its config.json names the same data
    and starting checkpoint, and it holds a checkpoint of iteration `cfg.iters` saved with the same run-defining
    settings. None otherwise."""
    folder, cfg = Path(folder), cfg.validate()
    config = folder / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("data") != str(Source.parse(data)):
        return None
    started = None if init is None else str(find_checkpoint(init).resolve())
    if _init_of(folder) != started:
        return None
    try:
        state = load_checkpoint(folder / "checkpoints", cfg.iters)
    except FileNotFoundError:  # not trained that far
        return None
    if _differing(Config.from_dict(state["config"]), cfg, RUN_DEFINING):
        return None
    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    device = pick_device(cfg.device)
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
        net.to(device)
    return TrainResult(folder, nets, cfg, float(state["fov_mm"]))


def stopped_run(folder: str | Path, init: str | Path | None = None) -> bool:
    """Whether `folder` holds a run started from `init` with a checkpoint to resume from."""
    started = None if init is None else str(find_checkpoint(init).resolve())
    return bool(list_checkpoints(Path(folder) / "checkpoints")) and _init_of(Path(folder)) == started
