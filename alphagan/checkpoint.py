"""Checkpoints that survive a crash mid-write and load without unpickling code.

Taught in notebook 03 (stopping and resuming).

A checkpoint holds only tensors, numbers, strings, lists and dicts (networks, optimisers, the iteration, the
config and every RNG state), so `torch.load(..., weights_only=True)` reads it: opening a checkpoint from
someone else never runs their code. It is written to a temporary file, flushed, then renamed over its final
name, so a reader sees either the old file or the complete new one; the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, iteration: int, state: dict, keep: int = 3) -> Path:
    """Write `state` atomically as checkpoint `iteration`, then delete all but the newest `keep`."""
    path = checkpoint_path(directory, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".ckpt_*.tmp"):  # left by a writer that was killed; one run writes here
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint's file: `path` itself, or for a folder its newest checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint (ckpt_*.pt) in this folder")
        path = found
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint (a file, or a folder's newest) with `weights_only=True`; a file that needs unpickling
    code is refused."""
    path = checkpoint_file(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
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
    return state


def load_latest(directory: str | Path, map_location="cpu") -> tuple[Path, dict]:
    """The newest checkpoint of `directory` that loads; a damaged newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as exc:
            warnings.warn(f"{exc}; resuming from an older checkpoint", stacklevel=2)
    raise FileNotFoundError(f"{directory}: no loadable checkpoint (ckpt_*.pt) to resume from")
