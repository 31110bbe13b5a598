"""Checkpoints that survive a crash mid-write and load without unpickling code.

Taught in notebook 03 (stopping and resuming).

A checkpoint holds only tensors, numbers, strings, lists and dicts (networks, optimisers, the iteration, the
config and every RNG state), so `torch.load(..., weights_only=True)` reads it: opening a checkpoint from
someone else never runs their code. It is written to a temporary file, flushed, then renamed over its final
name, so a reader sees either the old file or the complete new one; the last `keep` checkpoints are kept.
`find_checkpoint` locates one (a file, a folder of them, or a run folder), `load_checkpoint` reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from alphagan.config import SETTINGS, Config
from alphagan.folders import atomic, disk_full
from alphagan.models import build_networks

_NAME = re.compile(r"ckpt_(\d+)\.pt$")
CHECKPOINTS = "checkpoints"  # the folder of a run that holds its checkpoints (`runs.checkpoints_of`)
GIVE = "give a ckpt_*.pt file, a run folder or its checkpoints folder"
FULL_BELOW = 2**30  # a failed write with less free space than this (1 GiB) is a full disk


def _name(iteration: int) -> str:
    return f"ckpt_{iteration:08d}.pt"


def iteration_of(path: str | Path) -> int:
    """The iteration a checkpoint file's name records."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint's name (ckpt_<iteration>.pt)")
    return int(match.group(1))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_folder(folder: str | Path) -> Path:
    """The folder of checkpoints a user's `folder` names: itself, or a run folder's checkpoints folder."""
    folder = Path(folder)
    inner = folder / CHECKPOINTS
    return inner if inner.is_dir() and not list_checkpoints(folder) else folder


def find_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """A checkpoint's file: `path` itself, or in a folder the checkpoint of `iteration` (default: the newest)."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_folder(path)
        found = [path / _name(iteration)] if iteration is not None else list_checkpoints(path)[-1:]
        if not found or not found[0].exists():
            which = f"of iteration {iteration}" if iteration is not None else "(ckpt_*.pt)"
            raise FileNotFoundError(f"{path}: no checkpoint {which} in this folder; {GIVE}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint; {GIVE}")
    return path


def save_checkpoint(directory: str | Path, iteration: int, state: dict, keep: int = 3) -> Path:
    """Write `state` atomically as checkpoint `iteration`, then delete all but the newest `keep`."""
    path = Path(directory) / _name(iteration)
    try:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as exc:  # torch's writer reports a short write as "unexpected pos ..."
        if shutil.disk_usage(path.parent).free < FULL_BELOW:
            raise disk_full(path.parent) from None
        raise RuntimeError(
            f"{path}: the checkpoint could not be written ({exc}); check that {path.parent} is on a disk that can be "
            f"written, and resume (--resume)"
        ) from None
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_newest(directory: str | Path, map_location="cpu") -> tuple[Path, dict]:
    """The newest checkpoint in `directory` (`checkpoint_folder`) that loads, and its path: a damaged newer one is
    skipped, saying so."""
    directory = checkpoint_folder(directory)
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"{directory}: no checkpoint (ckpt_*.pt) in this folder; {GIVE}")
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except ValueError as exc:
            warnings.warn(f"{exc}; using the newest older checkpoint that loads", stacklevel=2)
    raise ValueError(
        f"{directory}: none of its {len(found)} checkpoints loads (reasons above); train the run again (--overwrite)"
    )


def open_checkpoint(path: str | Path, map_location="cpu") -> tuple[Path, dict]:
    """A checkpoint file, or a folder's newest checkpoint that loads (`load_newest`), with its state."""
    if Path(path).is_dir():
        return load_newest(path, map_location)
    return find_checkpoint(path), load_checkpoint(path, map_location=map_location)


def load_checkpoint(path: str | Path, iteration: int | None = None, map_location="cpu") -> dict:
    """The state of a checkpoint (`find_checkpoint(path, iteration)`; of a folder without `iteration`, the newest
    that loads: `load_newest`), read with `weights_only=True`: a file that needs unpickling code is refused, as is
    one that is not an alphagan checkpoint, or whose config does not describe its weights."""
    if iteration is None and Path(path).is_dir():
        return load_newest(path, map_location)[1]
    path = find_checkpoint(path, iteration)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a file torch wrote
        # torch's own message suggests weights_only=False, which would run the file's code: not repeated here.
        raise ValueError(
            f"{path}: not a loadable alphagan checkpoint ({type(exc).__name__}): truncated, or not written by "
            f"alphagan; give another checkpoint, or the run folder (its newest loadable one is used)"
        ) from None
    missing = {"config", "iter", "nets", "fov_mm"} - set(state) if isinstance(state, dict) else {"config"}
    if missing:
        raise ValueError(
            f"{path}: not an alphagan checkpoint (no {', '.join(sorted(missing))}); give one `alphagan train` wrote"
        )
    if not isinstance(state["config"], dict):
        kind = type(state["config"]).__name__
        raise ValueError(
            f"{path}: not an alphagan checkpoint (its config is a {kind}); give one `alphagan train` wrote"
        )
    unknown = sorted(set(state["config"]) - SETTINGS)
    if unknown:  # a newer version's settings; one that shaped the networks shows when their weights load
        warnings.warn(f"{path}: settings this version does not know, ignored: {', '.join(unknown)}", stacklevel=2)
        state["config"] = {k: v for k, v in state["config"].items() if k in SETTINGS}
    _check_contents(path, state)
    return state


def _check_contents(path: Path, state: dict) -> None:
    """A checkpoint is data: its config must be valid and describe exactly the weights it holds, checked against
    networks built on the `meta` device (shapes, no memory), so that a config asking for absurd sizes is refused
    before anything is allocated."""
    try:
        cfg = Config.from_dict(state["config"]).validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its config is not one alphagan trains ({exc}); the file is damaged") from None
    if not isinstance(state["iter"], int) or state["iter"] < 0:
        raise ValueError(f"{path}: its iteration is {state['iter']!r}, not a count; the file is damaged")
    fov = state["fov_mm"]
    if not isinstance(fov, (int, float)) or not 0 < fov < 1000:  # the cube's edge in mm, for generated volumes
        raise ValueError(f"{path}: its field of view is {fov!r}, not a cube's edge in mm; the file is damaged")
    with torch.device("meta"):
        nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    saved = state["nets"] if isinstance(state["nets"], dict) else {}
    for name, net in nets.items():
        weights = saved.get(name)
        if not isinstance(weights, dict):
            raise ValueError(f"{path}: no weights of network {name}, which a {cfg.model} has; the file is damaged")
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
        if found != expected:
            wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
            raise ValueError(
                f"{path}: network {name}'s weights do not match its config ({cfg.model}, size {cfg.size}, width "
                f"{cfg.width}, latent {cfg.latent}; first difference: {wrong[0]}); the file is damaged"
            )
        broken = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if broken is not None:  # it would generate NaN volumes, or train from them
            raise ValueError(
                f"{path}: network {name} holds NaN or infinite weights ({broken}): saved from a run that had "
                f"diverged, or damaged; give an earlier checkpoint"
            )
