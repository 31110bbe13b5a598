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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from alphagan.checkpoint import checkpoint_file, latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from alphagan.config import Config
from alphagan.data.dataset import Cohort, Source, load_training_volumes
from alphagan.losses import Terms
from alphagan.models import build_networks
from alphagan.sampling import calibrated_generator, generate, reconstruct, save_nifti
from alphagan.steps import UPDATES, Inputs, Update, draw, optimisers, set_trainable

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


def pick_device(name: str = "auto") -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU; or the device named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. `auto`: bf16 where the GPU computes it natively (Ampere and newer), fp16 with loss
    scaling on older GPUs (a T4 reports bf16 support through slow emulation), fp32 on other devices."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class FiniteWatch:
    """Notices a non-finite loss term on the device, without stopping the host; `check` reads it (a sync).

    Each update records, on the device, the index of the first update whose terms were not all finite and those
    terms' values, so the message can name the term and the iteration even when it is read many steps later."""

    def __init__(self, device: torch.device, updates_per_iteration: int, start: int):
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.snapshots: dict[str, tuple[list[str], torch.Tensor]] = {}
        self.per_iteration, self.start = updates_per_iteration, start

    def observe(self, name: str, terms: Terms) -> None:
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
        last_checkpoint = latest_checkpoint(ckpt_dir)
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


class Updater:
    """Runs each update: eagerly, or, with `graphs`, `GRAPH_WARMUP` times eagerly on a side stream, then captured
    once as a CUDA graph and replayed. Replaying launches the update's hundreds of kernels in one call; the
    inputs are read from the same tensors every time, which `draw(..., static=True)` refills."""

    def __init__(self, steps: dict[str, Callable[[], Terms]], graphs: bool):
        self.steps, self.graphs = steps, graphs
        self.calls = dict.fromkeys(steps, 0)
        self.captured: dict[str, tuple[torch.cuda.CUDAGraph, Terms]] = {}

    def __call__(self, name: str) -> Terms:
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


def _make_step(
    update: Update,
    nets: dict[str, nn.Module],
    train_nets: dict[str, nn.Module],
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
    watch: FiniteWatch,
    inputs: Inputs,
    cfg: Config,
) -> Callable[[], Terms]:
    """The update as one call: the networks that learn are the trainable (DDP/compiled) ones, the others plain."""
    called = {k: train_nets[k] if k in update.learns else net for k, net in nets.items()}

    def step() -> Terms:
        set_trainable(nets, update.learns)
        with autocast():
            loss, terms = update.loss(called, inputs, cfg)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        watch.observe(update.name, terms)
        return terms

    return step


def _use_graphs(cfg: Config, device: torch.device, distributed: bool, amp_dtype: torch.dtype) -> bool:
    """CUDA graphs where they are safe: one CUDA process, no compile, no fp16 loss scaling (host-side state)."""
    single_cuda = device.type == "cuda" and not distributed
    return cfg.cuda_graphs and single_cuda and not cfg.compile and amp_dtype != torch.float16


def _all_finite(nets: dict[str, nn.Module]) -> bool:
    """Every weight and statistic finite, read with one sync."""
    tensors = [t for net in nets.values() for t in net.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _progress_picture(nets, cfg: Config, fixed_z, fixed_x, device, out: Path, it: int) -> None:
    """Fixed-noise samples (G with recalibrated statistics) and reconstructions of fixed real volumes."""
    import matplotlib.pyplot as plt

    from alphagan.viz import three_plane_grid

    G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
    with torch.no_grad():
        groups = {"samples": list(G(fixed_z.to(device)).float().cpu())}
    if "E" in nets:
        groups["real"] = list(fixed_x)
        groups["reconstructions"] = list(reconstruct(nets["E"], nets["G"], fixed_x.to(device)).float().cpu())
    fig = three_plane_grid(groups, title=f"{cfg.model}, iteration {it}")
    (out / "samples").mkdir(exist_ok=True)
    fig.savefig(out / "samples" / f"iter_{it:06d}.png", dpi=80)
    plt.close(fig)


def _rng_state(cohort: Cohort, device: torch.device) -> dict:
    state = {**cohort.state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples")


def _claim_run_folder(out: Path, data: str, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a new run needs an empty one (or `overwrite`), a resumed run the
    same data it was trained on."""
    out.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails here, before any work
    held = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        config = out / "config.json"
        saved = json.loads(config.read_text()).get("data") if config.exists() else None
        if saved is not None and saved != data:
            raise ValueError(f"{config}: this run trained on {saved}, not {data}; resume with --data {saved}")
    elif held and not overwrite:
        raise FileExistsError(
            f"{out}: already holds a run ({', '.join(held)}); add --resume to continue it, --overwrite to replace "
            f"it, or choose another --out"
        )
    elif held and int(os.environ.get("RANK", 0)) == 0:
        for name in held:  # only the run's own files: anything else in the folder stays
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


NETWORK_DEFINING = ("model", "size", "width", "latent", "code_hidden")


def _started_from(run: Path) -> str | None:
    """The checkpoint a run's networks started from (`train(init=...)`), as its config.json records it."""
    config = run / "config.json"
    return json.loads(config.read_text()).get("init") if config.exists() else None


def _differing(saved: Config, cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """The settings among `keys` in which a checkpoint's config differs from this run's."""
    return [k for k in keys if getattr(saved, k) != getattr(cfg, k)]


def _start_from(init: str | Path, cfg: Config, nets) -> Path:
    """Load the network weights of checkpoint `init` (a file or a folder: its newest) into `nets`; returns the
    checkpoint's absolute path. Its networks must have the shapes of `cfg`'s."""
    path = checkpoint_file(init).resolve()
    state = load_checkpoint(path)
    saved = Config.from_dict(state["config"])
    changed = [f"{k} {getattr(saved, k)} != {getattr(cfg, k)}" for k in _differing(saved, cfg, NETWORK_DEFINING)]
    if changed:
        raise ValueError(f"{path}: its networks differ from this run's ({', '.join(changed)}); cannot start from it")
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    return path


def _restore(state: dict, cfg: Config, nets, optimisers_, cohort: Cohort, device, rank: int, path: Path) -> int:
    """Load a checkpoint's networks, optimisers and random states; returns its iteration."""
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
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    for k, opt in optimisers_.items():
        opt.load_state_dict(state["optimisers"][k])
    rng = state["rng"][rank]
    try:
        cohort.set_state(rng)
    except (RuntimeError, KeyError) as exc:  # saved on another kind of device: the draws cannot continue exactly
        raise ValueError(f"{path}: its random state is for another device; resume on the device that saved it") from exc
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["iter"])


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

    cfg = cfg.validate()
    out = Path(out)
    data = str(Source.parse(data))  # a cache as its absolute path: the run can be evaluated from anywhere
    use_headless_backend()
    _claim_run_folder(out, data, resume, overwrite)

    # ---- processes, device, precision -------------------------------------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = pick_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    master = rank == 0
    amp_dtype = pick_dtype(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
    graphs = _use_graphs(cfg, device, distributed, amp_dtype)

    # ---- data: batches, augmentation, noise and penalty weights all come from one generator per rank --------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    volumes, fov_mm = load_training_volumes(data, cfg.size, cfg.n_subjects, seed=cfg.seed, progress=progress and master)
    if len(volumes) < cfg.batch:
        raise ValueError(f"{data}: {len(volumes)} volumes, fewer than one batch of {cfg.batch}")
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    cohort = Cohort(volumes, device, rng, cfg.flip, cfg.intensity, memory_format)

    # ---- networks and optimisers -------------------------------------------------------------------------
    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden)
    for net in nets.values():
        net.to(device, memory_format=memory_format)
    updates = UPDATES[cfg.model]
    # Fused Adam: one pass over each parameter instead of one per arithmetic step; on a CPU the latent-sized
    # layers (millions of weights, a few multiply-adds each) otherwise spend more time in Adam than in the model.
    opts = optimisers(nets, updates, cfg, fused=True, capturable=graphs)
    scalers = {u.name: torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16) for u in updates}
    # `train_nets` are called where a network learns (wrapped for DDP / compile); `nets` are the plain modules
    # used frozen or under no_grad, so DDP only ever waits for gradients of the network being updated.
    train_nets = dict(nets)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_nets = {k: DDP(v, device_ids=ids, broadcast_buffers=False) for k, v in nets.items()}
    if cfg.compile:
        # Only the generator side: the critics' gradient penalty differentiates twice (create_graph=True), which
        # torch.compile's autograd does not support (measured: "does not currently support double backward").
        train_nets = {k: torch.compile(v) if k in ("E", "G") else v for k, v in train_nets.items()}

    # ---- resume -------------------------------------------------------------------------------------------
    start = 0
    ckpt_dir = out / "checkpoints"
    if resume:
        path, state = load_latest(ckpt_dir, map_location=device)
        start = _restore(state, cfg, nets, opts, cohort, device, rank, path)
    elif init is not None:
        init = _start_from(init, cfg, nets)
    log_path = out / "metrics.jsonl"
    if master:
        config = out / "config.json"
        started = str(init) if init is not None else _started_from(out) if resume else None
        settings = {**cfg.to_dict(), "data": data, "fov_mm": fov_mm, **({"init": started} if started else {})}
        config.write_text(json.dumps(settings, indent=2))
        if resume and log_path.exists():  # drop lines written after the checkpoint we resume from
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["iter"] <= start]
            log_path.write_text("".join(line + "\n" for line in kept))

    # ---- the update steps, chosen once -------------------------------------------------------------------
    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    schedule = [(u, u.times(cfg)) for u in updates]
    watch = FiniteWatch(device, sum(n for _, n in schedule), start)
    inputs: Inputs = {}
    run = Updater(
        {
            u.name: _make_step(u, nets, train_nets, opts[u.name], scalers[u.name], autocast, watch, inputs, cfg)
            for u in updates
        },
        graphs,
    )
    # Fixed noise and fixed real volumes: the same every time a progress picture is drawn.
    fixed_z = torch.randn(cfg.n_fixed, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_x = cohort.first(cfg.n_fixed)

    def checkpoint(it: int) -> None:
        watch.check(ckpt_dir)
        rng_state = _rng_state(cohort, device)
        rng_states = [rng_state]
        if distributed:  # every rank's streams, so a resumed multi-GPU run continues each of them
            for net in nets.values():  # running statistics averaged over the ranks
                for buffer in net.buffers():
                    if buffer.is_floating_point():
                        dist.all_reduce(buffer)
                        buffer /= world
            rng_states = [None] * world
            dist.all_gather_object(rng_states, rng_state)
        if not _all_finite(nets):
            raise TrainingDiverged(f"a weight became NaN or infinite by iteration {it}; no checkpoint written")
        if master:
            state = {
                "config": cfg.to_dict(),
                "iter": it,
                "fov_mm": fov_mm,
                "nets": {k: v.state_dict() for k, v in nets.items()},
                "optimisers": {k: v.state_dict() for k, v in opts.items()},
                "rng": rng_states,
            }
            save_checkpoint(ckpt_dir, it, state, keep=cfg.keep_ckpts)

    def log(done: int, terms: Terms, since: tuple[float, int]) -> None:
        watch.check(ckpt_dir)
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one sync
        record = {"iter": done, **{k: round(v, 6) for k, v in zip(terms, values)}}
        record["it_per_s"] = round((done - since[1]) / (time.perf_counter() - since[0]), 4)
        if device.type == "cuda":
            record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss_d", "loss_eg", "loss_g", "w_dist", "l1") if k in record})

    # ---- the loop -------------------------------------------------------------------------------------------
    quiet = not (progress and master)
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc=cfg.model, disable=quiet)
    since = (time.perf_counter(), start)
    for it in bar:
        terms: Terms = {}
        for update, repeats in schedule:
            for _ in range(repeats):
                draw(update.draws, inputs, cohort, cfg, static=graphs)
                terms.update(run(update.name))
        done = it + 1
        if master and (done % cfg.log_every == 0 or done == cfg.iters):
            log(done, terms, since)
            since = (time.perf_counter(), done)
        if master and (done % cfg.sample_every == 0 or done == cfg.iters):
            _progress_picture(nets, cfg, fixed_z, fixed_x, device, out, done)
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            checkpoint(done)
        if after_iteration is not None:
            after_iteration(done)

    # ---- final samples ---------------------------------------------------------------------------------------
    if master and start < cfg.iters:
        G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
        for i, volume in enumerate(generate(G, cfg.n_fixed, cfg.latent, seed=cfg.seed + 2)):
            save_nifti(volume, out / "samples" / f"sample_{i:04d}.nii.gz", fov_mm)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, nets, cfg, fov_mm)


def train_or_reuse(
    cfg: Config, data: str, out: str | Path, reuse: tuple[str | Path, ...] = (), init: str | Path | None = None
) -> TrainResult:
    """The run `cfg` on `data` (from the weights of `init`, if given), trained only when no finished one exists
    (notebooks 04-06 use it).

    A finished run is a folder, `out` or one of `reuse` (e.g. notebook 03's run), whose config.json names the same
    data and starting checkpoint and which holds a checkpoint of iteration `cfg.iters` saved with the same
    run-defining settings. A run in `out` that stopped earlier is resumed; otherwise `out` is trained from the
    start."""
    from alphagan.checkpoint import checkpoint_path

    cfg = cfg.validate()
    source = str(Source.parse(data))
    started = None if init is None else str(checkpoint_file(init).resolve())
    for folder in (Path(out), *map(Path, reuse)):
        path = checkpoint_path(folder / "checkpoints", cfg.iters)
        config = folder / "config.json"
        if not (path.exists() and config.exists()) or json.loads(config.read_text()).get("data") != source:
            continue
        if _started_from(folder) != started:
            continue
        state = load_checkpoint(path)
        saved = Config.from_dict(state["config"])
        if not _differing(saved, cfg, RUN_DEFINING):
            nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden)
            device = pick_device(cfg.device)
            for k, net in nets.items():
                net.load_state_dict(state["nets"][k])
                net.to(device)
            print(f"{cfg.model}: reusing the finished run in {folder} (iteration {cfg.iters})")
            return TrainResult(folder, nets, cfg, float(state["fov_mm"]))
    resume = latest_checkpoint(Path(out) / "checkpoints") is not None and _started_from(Path(out)) == started
    return train(cfg, data, out, resume=resume, overwrite=not resume, init=init)
