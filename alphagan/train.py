"""The training loop of the 3D alpha-WGAN-GP and its baselines, top to bottom (taught in notebook 03).

One iteration runs the model's updates in the paper's order (`alphagan.steps.UPDATES`):
  1. encoder + generator, `g_steps` times (two real updates by default: a fresh batch and fresh noise each),
  2. discriminator, `d_steps` times (1; 5 for WGAN-GP),
  3. code discriminator (alpha-GANs only).
While one network is updated the others are frozen (requires_grad off), so no step leaves gradients behind
in a network it must not change. The run's folder is `alphagan.runs`'s; the device, the processes and the CUDA
graphs are `alphagan.device`'s.

On a GPU the loop never waits for the host: the cohort lives on the GPU and is indexed and augmented there,
every random number comes from one generator on the GPU, a loss that turns NaN is noticed on the device and
read at log steps and before each checkpoint, and each update is replayed as a CUDA graph (`cuda_graphs`).

Run it with `python -m alphagan train ...`, or for several GPUs `torchrun --nproc_per_node=K -m alphagan train ...`
(DistributedDataParallel: each process draws its own batches and gradients are averaged. BatchNorm normalises
with each process's own batch statistics, like single-GPU training at the same per-GPU batch; SyncBatchNorm
would change the statistics the paper's batch of 4 gives. The running statistics are averaged over the
processes before every checkpoint, so that all ranks hold identical networks.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from alphagan import metrics, runs
from alphagan.checkpoint import load_newest, save_checkpoint
from alphagan.config import Config
from alphagan.data.dataset import Batches, Source, load_training_volumes
from alphagan.data.prepare import cache_contrasts, mixed_contrasts
from alphagan.device import (
    Graphed,
    describe,
    free_memory,
    out_of_memory_named,
    pick_device,
    pick_dtype,
    processes,
    use_graphs,
)
from alphagan.losses import Terms
from alphagan.models import build_networks
from alphagan.progress import tqdm
from alphagan.runs import TrainResult
from alphagan.sampling import calibrated_generator, generate, reconstruct, sample_names, save_nifti
from alphagan.steps import UPDATES, FiniteWatch, Inputs, TrainingDiverged, iteration, optimisers, update_steps
from alphagan.viz import planes_columns, save_figure, use_headless_backend


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
        return runs.checkpoints_of(self.out)


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


def _rng_state(run: Run) -> dict:
    state = {**run.batches.state(), "torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def _all_finite(nets: dict[str, nn.Module]) -> bool:
    """Every weight and statistic finite, read with one sync."""
    tensors = [t for net in nets.values() for t in net.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _check_data(cfg: Config, source: Source) -> None:
    """Refuse, before the run folder is claimed, a `source` without one batch at the run's size, or a cache whose
    scans' names say several contrasts (prepared before `prepare` refused them)."""
    count = cfg.n_subjects if source.synthetic else len(load_training_volumes(source, cfg.size, cfg.n_subjects)[0])
    if not source.synthetic and (mixed := mixed_contrasts(cache_contrasts(source.cache))):
        raise ValueError(
            f"{source}: holds {mixed}, and a model learns one; prepare a cache of one contrast (prepare --modality)"
        )
    if count >= cfg.batch:
        return
    gives = [f"--batch {count} or less"] if count >= 2 else []  # BatchNorm needs two volumes in a batch
    if source.synthetic:
        gives.append(f"--n-subjects {cfg.batch} or more")
    fixes = [f"give {' or '.join(gives)}"] if gives else []
    fixes += [] if source.synthetic else ["prepare more subjects"]
    raise ValueError(f"{source}: {count} volumes, fewer than one batch (--batch {cfg.batch}); {', or '.join(fixes)}")


def _setup(cfg: Config, data: str, out: Path, resume: bool, init: str | Path | None, progress: bool) -> Run:
    """Device and processes, the batches, the networks and their optimisers, and the state to start from."""
    device, rank, world = processes(cfg.device)
    memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format

    # Batches, augmentation, noise and penalty weights all come from one generator per rank.
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    volumes, fov_mm = load_training_volumes(
        data, cfg.size, cfg.n_subjects, seed=cfg.seed, progress=progress and rank == 0
    )
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
        run.start = runs.restore(state, path, cfg, nets, opts, batches, rank)
    elif init is not None:
        start_weights = runs.load_init(init, cfg, nets)
    if run.master:
        runs.write_settings(out, cfg, data, fov_mm, run.start, resume, start_weights)
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
    nets, cfg = run.nets, run.cfg
    G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    with torch.no_grad():
        samples = G(run.fixed_z.to(run.device)).float().cpu()
    groups, spread_of = {"samples": list(samples)}, {"sample_spread": samples}
    if "E" in nets:
        rec = reconstruct(nets["E"], nets["G"], run.fixed_x)
        groups["real"], groups["reconstructions"] = list(run.fixed_x), list(rec)
        spread_of["rec_spread"] = rec
    save_figure(
        planes_columns(groups, title=f"{cfg.model}, iteration {it}"), run.out / runs.SAMPLES / f"iter_{it:06d}.png", 80
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
    runs.append_log(run.out, record)
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


def _final_samples(run: Run) -> None:
    """A few NIfTI samples of the finished run."""
    cfg = run.cfg
    G = calibrated_generator(run.nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    for name, volume in zip(sample_names(cfg.n_fixed), generate(G, cfg.n_fixed, cfg.latent, seed=cfg.seed + 2)):
        save_nifti(volume, run.out / runs.SAMPLES / name, run.fov_mm)


BYTES_PER_WEIGHT = 16  # float32: the weight, its gradient and Adam's two moments


def _check_networks_fit(cfg: Config, device: torch.device) -> None:
    """Refuse networks whose weights alone, with their gradients and Adam's moments, exceed the memory free on
    `device`, counted on the `meta` device before anything is allocated (a mistyped --width or --latent)."""
    with torch.device("meta"):
        nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    weights = sum(p.numel() for net in nets.values() for p in net.parameters())
    needed, free = weights * BYTES_PER_WEIGHT, free_memory(device)
    if needed > free:
        raise MemoryError(
            f"--width {cfg.width}, --latent {cfg.latent}, --size {cfg.size}: the {cfg.model} networks' "
            f"{weights / 1e6:,.0f} M weights, with their gradients and Adam's moments, need {needed / 2**30:,.1f} GiB, "
            f"and {free / 2**30:,.1f} GiB are free on {describe(device)}; give a smaller --width or --latent"
        )


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
    cfg, out = cfg.validate(), Path(out)
    device = pick_device(cfg.device)  # a device this machine lacks is refused before the run folder is made
    _check_networks_fit(cfg, device)
    source = Source.parse(data)
    data = str(source)  # a cache as its absolute path: the run can be evaluated from anywhere
    if resume:
        runs.check_resume_data(out, data)
        runs.check_resume_settings(out, cfg)
    _check_data(cfg, source)
    use_headless_backend()
    with (
        runs.claim_run(out, cfg, data, resume, overwrite, init),
        out_of_memory_named(device, "give a smaller --batch, --size, --width or --latent"),
    ):
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

        if run.master and (run.start < cfg.iters or not runs.final_samples_written(out, cfg)):
            _final_samples(run)
    if run.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, run.nets, cfg, run.fov_mm)
