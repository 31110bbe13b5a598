"""Checkpoints that survive a crash mid-write and load without unpickling code.

Taught in notebook 03 (stopping and resuming).

A checkpoint holds only tensors, numbers, strings, lists and dicts (networks, optimisers, the iteration, the
config and every RNG state), so `torch.load(..., weights_only=True)` reads it: opening a checkpoint from
someone else never runs their code. It is written to a temporary file, flushed, then renamed over its final
name, so a reader sees either the old file or the complete new one; the last `keep` checkpoints are kept.
`find_checkpoint` locates one (a file, or a run's folder), `load_checkpoint` reads it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path

import torch

from alphagan.config import Config
from alphagan.folders import atomic

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def _name(iteration: int) -> str:
    return f"ckpt_{iteration:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """A checkpoint's file: `path` itself, or in a folder the checkpoint of `iteration` (default: the newest)."""
    path = Path(path)
    if path.is_dir():
        found = [path / _name(iteration)] if iteration is not None else list_checkpoints(path)[-1:]
        if not found or not found[0].exists():
            which = f"of iteration {iteration}" if iteration is not None else "(ckpt_*.pt)"
            raise FileNotFoundError(f"{path}: no checkpoint {which} in this folder")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return path


def save_checkpoint(directory: str | Path, iteration: int, state: dict, keep: int = 3) -> Path:
    """Write `state` atomically as checkpoint `iteration`, then delete all but the newest `keep`."""
    path = Path(directory) / _name(iteration)
    with atomic(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_checkpoint(path: str | Path, iteration: int | None = None, map_location="cpu") -> dict:
    """The state of a checkpoint (`find_checkpoint(path, iteration)`), read with `weights_only=True`: a file that
    needs unpickling code is refused, as is one that is not an alphagan checkpoint."""
    path = find_checkpoint(path, iteration)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a file torch wrote
        # torch's own message suggests weights_only=False, which would run the file's code: not repeated here.
        raise ValueError(
            f"{path}: not a loadable alphagan checkpoint ({type(exc).__name__}): truncated, or not written by alphagan"
        ) from None
    missing = {"config", "iter", "nets"} - set(state) if isinstance(state, dict) else {"config"}
    if missing:
        raise ValueError(f"{path}: not an alphagan checkpoint (no {', '.join(sorted(missing))})")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(state["config"]) - known)
    if unknown:  # a newer version's settings; one that shaped the networks shows when their weights load
        warnings.warn(f"{path}: settings this version does not know, ignored: {', '.join(unknown)}", stacklevel=2)
        state["config"] = {k: v for k, v in state["config"].items() if k in known}
    return state
