"""Each model's updates as a table, chosen once before the training loop (taught in notebook 03).

An iteration runs a model's updates in order, each `repeats` times: for the alpha-WGAN-GP, E+G twice, then D,
then C. An `Update` says which networks learn (the others are frozen), which random inputs it draws fresh, and
its loss. Inputs are drawn by `draw`, from one generator, into one dict that the updates share: the code
discriminator, which draws no volumes, scores codes of the real batch the image critic just saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from alphagan import losses
from alphagan.checkpoint import list_checkpoints
from alphagan.config import Config
from alphagan.data.dataset import Batches

Nets = dict[str, nn.Module]
Inputs = dict[str, Tensor]
LossFn = Callable[[Nets, Inputs, Config], tuple[Tensor, losses.Terms]]
Watch = Callable[[str, losses.Terms], None]  # called with each update's name and terms


@dataclass(frozen=True)
class Update:
    """One of a model's updates: its optimiser's name, the networks it trains, what it draws, its loss."""

    name: str
    learns: tuple[str, ...]
    draws: tuple[str, ...]  # x: an augmented real batch; z, eps: N(0, I) codes; alpha, alpha2: U(0, 1) per sample
    loss: LossFn
    repeats: str | None = None  # the Config field with the number of runs per iteration; None: once

    def times(self, cfg: Config) -> int:
        return getattr(cfg, self.repeats) if self.repeats else 1


# Looked up in `losses` at call time, so a test can replace a loss function there.
def _alpha_wgan_gp_eg(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.alpha_wgan_gp_eg(n["E"], n["G"], n["D"], n["C"], b["x"], b["z"], cfg.lambda_rec)


def _alpha_wgan_gp_d(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    alphas = (b["alpha"], b["alpha2"])
    return losses.alpha_wgan_gp_d(n["E"], n["G"], n["D"], b["x"], b["z"], cfg.lambda_gp, alphas)


def _alpha_wgan_gp_c(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.alpha_wgan_gp_c(n["E"], n["C"], b["x"], b["z"], cfg.lambda_gp, b["alpha"])


def _alpha_gan_eg(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.alpha_gan_eg(n["E"], n["G"], n["D"], n["C"], b["x"], b["z"], cfg.lambda_rec)


def _alpha_gan_d(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.alpha_gan_d(n["E"], n["G"], n["D"], b["x"], b["z"])


def _alpha_gan_c(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.alpha_gan_c(n["E"], n["C"], b["x"], b["z"])


def _wgan_gp_g(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.wgan_gp_g(n["G"], n["D"], b["z"])


def _wgan_gp_d(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.wgan_gp_d(n["G"], n["D"], b["x"], b["z"], cfg.lambda_gp, b["alpha"])


def _vae_gan_eg(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.vae_gan_eg(n["E"], n["G"], n["D"], b["x"], b["z"], b["eps"], cfg.lambda_rec, cfg.beta_kl)


def _vae_gan_d(n: Nets, b: Inputs, cfg: Config) -> tuple[Tensor, losses.Terms]:
    return losses.vae_gan_d(n["E"], n["G"], n["D"], b["x"], b["z"])


UPDATES: dict[str, tuple[Update, ...]] = {
    "alpha-wgan-gp": (
        Update("EG", ("E", "G"), ("x", "z"), _alpha_wgan_gp_eg, "g_steps"),
        Update("D", ("D",), ("x", "z", "alpha", "alpha2"), _alpha_wgan_gp_d, "d_steps"),
        Update("C", ("C",), ("z", "alpha"), _alpha_wgan_gp_c),
    ),
    "alpha-gan": (
        Update("EG", ("E", "G"), ("x", "z"), _alpha_gan_eg, "g_steps"),
        Update("D", ("D",), ("x", "z"), _alpha_gan_d, "d_steps"),
        Update("C", ("C",), ("z",), _alpha_gan_c),
    ),
    "wgan-gp": (
        Update("G", ("G",), ("z",), _wgan_gp_g, "g_steps"),
        Update("D", ("D",), ("x", "z", "alpha"), _wgan_gp_d, "d_steps"),
    ),
    "vae-gan": (
        Update("EG", ("E", "G"), ("x", "z", "eps"), _vae_gan_eg, "g_steps"),
        Update("D", ("D",), ("x", "z"), _vae_gan_d, "d_steps"),
    ),
}


def draw(keys: tuple[str, ...], inputs: Inputs, batches: Batches, cfg: Config, static: bool = False) -> None:
    """Draw fresh `keys` into `inputs`, in order, from the batches's generator. With `static`, write into the
    tensors already there (a CUDA graph reads its inputs from fixed addresses)."""
    rng = batches.generator
    for key in keys:
        if key == "x":
            value = batches.batch(cfg.batch)
        elif key in ("z", "eps"):
            value = torch.randn(cfg.batch, cfg.latent, generator=rng, device=rng.device)
        else:
            value = torch.rand(cfg.batch, generator=rng, device=rng.device)
        if static and key in inputs:
            inputs[key].copy_(value)
        else:
            inputs[key] = value


def set_trainable(nets: Nets, learns: tuple[str, ...]) -> None:
    """Gradients for the networks that learn in this update only, so no update leaves gradients elsewhere."""
    for name, net in nets.items():
        net.requires_grad_(name in learns)


def optimisers(nets: Nets, updates: tuple[Update, ...], cfg: Config, **adam) -> dict[str, torch.optim.Optimizer]:
    """One Adam per update, over the parameters of the networks it trains."""
    return {
        u.name: torch.optim.Adam(
            [p for k in u.learns for p in nets[k].parameters()], lr=cfg.lr, betas=tuple(cfg.betas), **adam
        )
        for u in updates
    }


def run_update(
    update: Update,
    nets: Nets,
    optimiser: torch.optim.Optimizer,
    inputs: Inputs,
    cfg: Config,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    watch: Watch | None = None,
) -> losses.Terms:
    """One update: freeze the other networks, compute the loss, step the optimiser. `train()` runs this same
    function, with `autocast` (mixed precision), `scaler` (fp16 loss scaling) and `watch` (a NaN check that does
    not stop the GPU), and replays it as a CUDA graph on a GPU."""
    set_trainable(nets, update.learns)
    with autocast():
        loss, terms = update.loss(nets, inputs, cfg)
    optimiser.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimiser.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
    if watch is not None:
        watch(update.name, terms)
    return terms


def update_steps(
    nets: Nets,
    opts: dict[str, torch.optim.Optimizer],
    inputs: Inputs,
    cfg: Config,
    amp_dtype: torch.dtype,
    learning: Nets | None = None,
    watch: Watch | None = None,
) -> dict[str, Callable[[], losses.Terms]]:
    """Each update of `cfg.model` as one call of `run_update` with no arguments, as `train()` runs and, on a GPU,
    captures it as a CUDA graph: autocast to `amp_dtype`, fp16 loss scaling, the networks that learn called as
    `learning` (DDP- or compile-wrapped; default: `nets`), the others plain."""
    device_type = _device_type(nets)
    mixed = amp_dtype != torch.float32
    autocast = partial(torch.autocast, device_type, dtype=amp_dtype) if mixed else nullcontext
    learning = learning or nets
    steps = {}
    for u in UPDATES[cfg.model]:
        called = {k: learning[k] if k in u.learns else net for k, net in nets.items()}
        scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        steps[u.name] = partial(run_update, u, called, opts[u.name], inputs, cfg, scaler, autocast, watch)
    return steps


def _device_type(nets: Nets) -> str:
    return next(p for net in nets.values() for p in net.parameters()).device.type


def iteration(
    updates: tuple[Update, ...],
    step: Callable[[Update], losses.Terms],
    inputs: Inputs,
    batches: Batches,
    cfg: Config,
    static: bool = False,
) -> losses.Terms:
    """One training iteration: each of `updates`, its number of times, on freshly drawn inputs, run by `step`
    (`run_update` with the update's networks and optimiser; in `train()`, also its CUDA graph). Returns the terms
    of each update's last run. Notebook 03 writes this loop out before `train()` calls it."""
    terms: losses.Terms = {}
    for update in updates:
        for _ in range(update.times(cfg)):
            draw(update.draws, inputs, batches, cfg, static=static)
            terms.update(step(update))
    return terms


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

    def __call__(self, name: str, terms: losses.Terms) -> None:
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
