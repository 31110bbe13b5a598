"""The training loop of the 3D alpha-WGAN-GP and its baselines, top to bottom.

One iteration, as the paper orders it:
  1. encoder + generator, `g_steps` times (two real updates by default: a fresh batch and fresh noise each),
  2. discriminator, `d_steps` times (1; 5 for WGAN-GP),
  3. code discriminator (alpha-GANs only).
While one network is updated the others are frozen (requires_grad off), so no step leaves gradients behind
in a network it must not change.

Run it with `python -m alphagan train ...`, or for several GPUs `torchrun --nproc_per_node=K -m alphagan train ...`
(DistributedDataParallel: each process draws its own batches and gradients are averaged. BatchNorm normalises
with each process's own batch statistics, like single-GPU training at the same per-GPU batch; SyncBatchNorm
would change the statistics the paper's batch of 4 gives. The running statistics, which each process updates
from its own data, are averaged over the processes before every checkpoint and at the end, so that all ranks
hold identical networks and the saved statistics have seen every process's data.)
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from alphagan import losses
from alphagan.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alphagan.config import Config
from alphagan.data.dataset import augment, load_training_volumes
from alphagan.models import build_networks
from alphagan.sampling import calibrated_generator, generate, save_nifti

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
    """bf16 autocast on CUDA GPUs that support it (no loss scaling needed), float32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _set_frozen(nets: dict[str, nn.Module], trainable: tuple[str, ...]) -> None:
    for name, net in nets.items():
        net.requires_grad_(name in trainable)


def _check_finite(terms: dict[str, torch.Tensor], iteration: int) -> None:
    values = torch.stack([t.float() for t in terms.values()])
    if not bool(torch.isfinite(values).all()):
        bad = [f"{k} = {float(v)}" for k, v in terms.items() if not math.isfinite(float(v))]
        raise TrainingDiverged(
            f"{', '.join(bad)} at iteration {iteration}; the run stopped before this update, "
            f"the last checkpoint is intact (lower the learning rate or try --precision fp32)"
        )


def train(cfg: Config, data: str, out: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train `cfg.model` on `data` (a cache folder or `synth[:kind[:contrast]]`), writing everything to `out`."""
    from tqdm.auto import tqdm

    from alphagan.viz import three_plane_grid, use_headless_backend

    cfg = cfg.validate()
    out = Path(out)
    use_headless_backend()

    # ---- processes and device ---------------------------------------------------------------------------
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

    # ---- data ---------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    volumes, fov_mm = load_training_volumes(data, cfg.size, cfg.n_subjects, seed=cfg.seed, progress=progress and master)
    volumes = torch.from_numpy(np.array(volumes, dtype=np.float32))  # in memory (a cache is memory-mapped)
    n_volumes = len(volumes)
    if n_volumes < cfg.batch:
        raise ValueError(f"{data}: {n_volumes} volumes, fewer than one batch of {cfg.batch}")
    # Batches, augmentation and noise come from this generator, the penalty's mixing weights from torch's global
    # ones; all their states are checkpointed, so a resumed run draws exactly what an uninterrupted one would.
    rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def next_batch() -> torch.Tensor:
        index = torch.randint(n_volumes, (cfg.batch,), generator=rng)
        x = augment(volumes[index].unsqueeze(1), rng, cfg.flip, cfg.intensity)
        return x.to(device, non_blocking=True).contiguous(memory_format=memory_format)

    def noise() -> torch.Tensor:
        return torch.randn(cfg.batch, cfg.latent, generator=rng).to(device, non_blocking=True)

    # ---- networks and optimisers -------------------------------------------------------------------------
    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden)
    for net in nets.values():
        net.to(device, memory_format=memory_format)
    adam = dict(lr=cfg.lr, betas=tuple(cfg.betas))
    eg = "EG" if "E" in nets else "G"  # the generator side: E and G as one network, or G alone (WGAN-GP)
    groups = {eg: ("E", "G") if "E" in nets else ("G",), "D": ("D",)}
    if "C" in nets:
        groups["C"] = ("C",)
    optimisers = {
        k: torch.optim.Adam([p for n in names for p in nets[n].parameters()], **adam) for k, names in groups.items()
    }
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
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        state = load_checkpoint(path, map_location=device)
        saved = Config.from_dict(state["config"])
        changed = [k for k in RUN_DEFINING if getattr(saved, k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"{path}: saved with different {', '.join(changed)} "
                f"({', '.join(f'{getattr(saved, k)} != {getattr(cfg, k)}' for k in changed)})"
            )
        for k, net in nets.items():
            net.load_state_dict(state["nets"][k])
        for k, opt in optimisers.items():
            opt.load_state_dict(state["optimisers"][k])
        rng.set_state(state["rng"][rank]["loop"])
        torch.set_rng_state(state["rng"][rank]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
        start = state["iter"]
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "data": data, "fov_mm": fov_mm}, indent=2))
    log_path = out / "metrics.jsonl"
    if master and resume and log_path.exists():  # drop lines written after the checkpoint we resume from
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["iter"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    # Fixed noise and fixed real volumes: the same every time a progress picture is drawn.
    fixed_z = torch.randn(cfg.n_fixed, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_x = volumes[: cfg.n_fixed].unsqueeze(1)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    def update(group: str, loss: torch.Tensor, terms: dict, it: int) -> None:
        _check_finite(terms, it + 1)  # iterations are counted from 1 in logs and checkpoints
        optimisers[group].zero_grad(set_to_none=True)
        loss.backward()
        optimisers[group].step()

    def progress_picture(it: int) -> None:
        """Fixed-noise samples (G with recalibrated statistics) and reconstructions of fixed real volumes."""
        import matplotlib.pyplot as plt

        G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
        with torch.no_grad():
            groups = {"samples": list(G(fixed_z.to(device)).float().cpu())}
            if "E" in nets:
                nets["E"].eval()
                code = nets["E"](fixed_x.to(device))
                code = code[0] if isinstance(code, tuple) else code  # VAE-GAN: the posterior mean
                nets["E"].train()
                # Reconstructions use batch statistics (a throw-away copy in train mode): the encoder's codes
                # are not N(0, I) early in training, so the statistics calibrated for samples do not fit them.
                groups["real"] = list(fixed_x)
                groups["reconstructions"] = list(copy.deepcopy(nets["G"]).train()(code).float().cpu())
        fig = three_plane_grid(groups, title=f"{cfg.model}, iteration {it}")
        (out / "samples").mkdir(exist_ok=True)
        fig.savefig(out / "samples" / f"iter_{it:06d}.png", dpi=80)
        plt.close(fig)

    def average_running_statistics() -> None:
        for net in nets.values():
            for buffer in net.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= world

    def checkpoint(it: int) -> None:
        # The loop's generator, and torch's global ones (the penalty's mixing weights are drawn from those).
        rng_state = {"loop": rng.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng_state["cuda"] = torch.cuda.get_rng_state(device)
        rng_states = [rng_state]
        if distributed:  # every rank's streams, so a resumed multi-GPU run continues each of them
            average_running_statistics()
            rng_states = [None] * world
            dist.all_gather_object(rng_states, rng_state)
        if master:
            save_checkpoint(
                ckpt_dir,
                it,
                {
                    "config": cfg.to_dict(),
                    "iter": it,
                    "fov_mm": fov_mm,
                    "nets": {k: v.state_dict() for k, v in nets.items()},
                    "optimisers": {k: v.state_dict() for k, v in optimisers.items()},
                    "rng": rng_states,
                },
                keep=cfg.keep_ckpts,
            )

    # ---- the loop -------------------------------------------------------------------------------------------
    bar = tqdm(
        range(start, cfg.iters), initial=start, total=cfg.iters, desc=cfg.model, disable=not (progress and master)
    )
    t_last, it_last = time.perf_counter(), start
    E, G, D, C = (train_nets.get(k) for k in "EGDC")
    for it in bar:
        terms: dict[str, torch.Tensor] = {}

        # 1. encoder + generator
        _set_frozen(nets, groups[eg])
        for _ in range(cfg.g_steps):
            x, z_r = next_batch(), noise()
            with autocast():
                if cfg.model == "alpha-wgan-gp":
                    loss, t = losses.alpha_wgan_gp_eg(E, G, nets["D"], nets["C"], x, z_r, cfg.lambda_rec)
                elif cfg.model == "alpha-gan":
                    loss, t = losses.alpha_gan_eg(E, G, nets["D"], nets["C"], x, z_r, cfg.lambda_rec)
                elif cfg.model == "vae-gan":
                    loss, t = losses.vae_gan_eg(E, G, nets["D"], x, z_r, noise(), cfg.lambda_rec, cfg.beta_kl)
                else:
                    loss, t = losses.wgan_gp_g(G, nets["D"], z_r)
            update(eg, loss, t, it)
            terms.update(t)

        # 2. discriminator
        _set_frozen(nets, ("D",))
        for _ in range(cfg.d_steps):
            x, z_r = next_batch(), noise()
            with autocast():
                if cfg.model == "alpha-wgan-gp":
                    loss, t = losses.alpha_wgan_gp_d(nets["E"], nets["G"], D, x, z_r, cfg.lambda_gp)
                elif cfg.model == "alpha-gan":
                    loss, t = losses.alpha_gan_d(nets["E"], nets["G"], D, x, z_r)
                elif cfg.model == "vae-gan":
                    loss, t = losses.vae_gan_d(nets["E"], nets["G"], D, x, z_r)
                else:
                    loss, t = losses.wgan_gp_d(nets["G"], D, x, z_r, cfg.lambda_gp)
            update("D", loss, t, it)
            terms.update(t)

        # 3. code discriminator, on codes of the same real batch, computed without gradient
        if "C" in nets:
            _set_frozen(nets, ("C",))
            z_r = noise()
            with autocast():
                if cfg.model == "alpha-wgan-gp":
                    loss, t = losses.alpha_wgan_gp_c(nets["E"], C, x, z_r, cfg.lambda_gp)
                else:
                    loss, t = losses.alpha_gan_c(nets["E"], C, x, z_r)
            update("C", loss, t, it)
            terms.update(t)

        # 4. log, pictures, checkpoints
        done = it + 1
        if master and (done % cfg.log_every == 0 or done == cfg.iters):
            now = time.perf_counter()
            record = {
                "iter": done,
                **{k: round(float(v), 6) for k, v in terms.items()},
                "it_per_s": round((done - it_last) / (now - t_last), 4),
            }
            if device.type == "cuda":
                record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(
                {k: f"{record[k]:.3g}" for k in ("loss_d", "loss_eg", "loss_g", "w_dist", "l1") if k in record}
            )
            t_last, it_last = now, done
        if master and (done % cfg.sample_every == 0 or done == cfg.iters):
            progress_picture(done)
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            checkpoint(done)

    # ---- final samples ---------------------------------------------------------------------------------------
    if master and start < cfg.iters:
        G = calibrated_generator(nets["G"], cfg.latent, batch=cfg.batch, seed=cfg.seed)
        for i, volume in enumerate(generate(G, cfg.n_fixed, cfg.latent, seed=cfg.seed + 2)):
            save_nifti(volume, out / "samples" / f"sample_{i:03d}.nii.gz", fov_mm)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, nets, cfg, fov_mm)
