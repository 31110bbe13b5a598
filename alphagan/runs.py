"""A training run's folder, and everything about it that outlives the process: where its checkpoints, log and
samples are, its config.json (settings, data and its digest, the starting checkpoint), the claim that makes the
folder this run's, what resuming it requires, and whether it finished or stopped. Every caller asks this module
(the loop in `train.py`, the course's reuse of finished runs, `evaluate`'s memorisation check).

Taught in notebook 03 (stopping and resuming).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alphagan.checkpoint import (
    CHECKPOINTS,
    checkpoint_folder,
    find_checkpoint,
    iteration_of,
    list_checkpoints,
    load_checkpoint,
    load_newest,
)
from alphagan.config import SETTINGS, Config
from alphagan.data.dataset import Batches, Source, data_digest, same_data
from alphagan.device import pick_device
from alphagan.folders import FolderRefused, atomic, claim, owner_record
from alphagan.models import build_networks
from alphagan.sampling import sample_names

CONFIG, LOG, SAMPLES = "config.json", "metrics.jsonl", "samples"
RUN_FILES = [CONFIG, LOG, CHECKPOINTS, SAMPLES]


def checkpoints_of(out: str | Path) -> Path:
    """The checkpoint folder of the run in `out`."""
    return Path(out) / CHECKPOINTS


def run_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint (a ckpt_*.pt file, a run's checkpoint folder or the run folder) belongs to."""
    path = Path(checkpoint)
    return checkpoint_folder(path).parent if path.is_dir() else path.parent.parent


def saved_config(out: str | Path) -> dict:
    """The run's config.json as a dict; empty where there is none yet. A damaged one is refused, naming the fix."""
    path = Path(out) / CONFIG
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError:  # not JSON, or not UTF-8
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("data", ""), (str, type(None))):
        raise ValueError(
            f"{path}: damaged (not the settings `train` writes); delete it, and the run's newest checkpoint gives "
            f"its settings (resuming then needs --data)"
        )
    return saved


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


@dataclass
class TrainResult:
    """What a run leaves: its folder, the trained networks (plain modules, on their device) and settings."""

    out: Path
    nets: dict[str, nn.Module]
    config: Config
    fov_mm: float


def check_resume_data(out: Path, data: str) -> None:
    """A resumed run continues on the data it was trained on: the same source, and for a cache the same contents
    (`data_digest`), not a cache prepared again under the same name. The same contents moved to another folder are
    that data."""
    config, saved = out / CONFIG, saved_config(out)
    was, digest, source = saved.get("data"), saved.get("data_digest"), Source.parse(data)
    if was == data and not source.synthetic and not source.cache.is_dir():
        raise FileNotFoundError(
            f"{data}: no such folder, and this run trained on it ({config}); if the cache moved, give its new place "
            f"with --data"
        )
    if was not in (None, data) and not same_data(digest, data):
        there = Source.parse(was).synthetic or Path(was).is_dir()
        fix = "leave out --data to resume on the run's own" if there else "give --data where that cache is now"
        raise ValueError(f"{config}: this run trained on {was}, not {data}; {fix}, or train into a new --out")
    if digest is not None and not same_data(digest, data):
        raise ValueError(
            f"{data}: prepared again since this run started (its manifest.tsv or settings.json differs from what "
            f"{config} records); resume on the cache it trained on, or train into a new --out"
        )


def _check_something_to_resume(out: Path, resume: bool, overwrite: bool) -> None:
    """A run stopped before its first checkpoint, or no run at all, has nothing to continue: say so, and what does
    work, before the folder is claimed."""
    if overwrite or list_checkpoints(checkpoints_of(out)):
        return
    record = owner_record(out) if out.is_dir() else None
    if record is not None and record["command"] == "train" and (resume or (out / CONFIG).exists()):
        raise FolderRefused(
            f"{out}: holds a run that stopped before its first checkpoint, so there is nothing to resume; add "
            f"--overwrite to start it again, or choose another --out"
        )
    if resume:
        raise FileNotFoundError(
            f"{out}: no run to resume here (no checkpoint in {checkpoints_of(out)}); leave out --resume to start one"
        )


def stopped_note(out: str | Path) -> str:
    """What a run stopped by Ctrl-C or a SIGTERM keeps, and the command that continues it."""
    found = list_checkpoints(checkpoints_of(out))
    if not found:
        again = "with --overwrite" if Path(out).exists() else "the same command"  # a claim nothing was written to goes
        return f"{out} stopped before its first checkpoint, so there is nothing to resume; start again: {again}"
    iteration = iteration_of(found[-1])
    return (
        f"{out} keeps iteration {iteration} ({found[-1]}); continue it with `python -m alphagan train --out {out} "
        f"--resume`"
    )


def run_settings(out: str | Path) -> tuple[Config, str | None] | None:
    """The settings and the data of the run in `out` (what `--resume` continues with): its config.json's, or where
    that is gone its newest checkpoint's settings and no data; None where there is no run."""
    saved = saved_config(out)
    if saved:
        try:
            return Config.from_dict({k: v for k, v in saved.items() if k in SETTINGS}).validate(), saved.get("data")
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{Path(out) / CONFIG}: damaged ({exc}); delete it, and the run's newest checkpoint gives its settings "
                f"(resuming then needs --data)"
            ) from None
    if not list_checkpoints(checkpoints_of(out)):
        return None
    return Config.from_dict(load_newest(checkpoints_of(out))[1]["config"]), None


def claim_run(out: Path, cfg: Config, data: str, resume: bool, overwrite: bool, init: str | Path | None):
    """The run folder, locked for this run (`alphagan.folders.claim`): a new run needs a folder that is new, empty
    or, with `overwrite`, an earlier run's (only its files are deleted, never those `init` or `data` point into).
    Rank 0 holds it for all processes of a DDP run."""
    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    _check_something_to_resume(out, resume, overwrite)
    keep = {"--init": _resolved(init), "--data": Source.parse(data).cache}  # the file it reads, not its folder
    settings = {"model": cfg.model, "data": data}
    return claim(out, "train", settings, RUN_FILES, resume=resume, overwrite=overwrite, again=False, keep=keep)


NETWORK_DEFINING = ("model", "size", "width", "latent", "code_hidden", "critic_norm")


def init_of(run: Path) -> str | None:
    """The checkpoint a run's networks started from (`train(init=...)`), as its config.json records it."""
    return saved_config(run).get("init")


def _resolved(init: str | Path | None) -> str | None:
    """The checkpoint file `init` names (a folder: its newest), as config.json records a run's start."""
    return None if init is None else str(find_checkpoint(init).resolve())


def differing(saved: Config, cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """The settings among `keys` in which a checkpoint's config differs from this run's."""
    return [k for k in keys if getattr(saved, k) != getattr(cfg, k)]


def _check_same_run(saved: Config, cfg: Config, where: Path) -> None:
    """Refuse to continue a run saved (`where`: in a checkpoint or config.json) with `saved` as `cfg`, where they
    differ in a setting that defines the run (`RUN_DEFINING`)."""
    changed = differing(saved, cfg, RUN_DEFINING)
    if changed:
        raise ValueError(
            f"{where}: saved with different {', '.join(changed)} "
            f"({', '.join(f'{getattr(saved, k)} != {getattr(cfg, k)}' for k in changed)}); leave out --profile and "
            f"those flags to resume with the run's own settings, or train into a new --out"
        )


def check_resume_settings(out: Path, cfg: Config) -> None:
    """Refuse `--resume` with settings that differ from the run's config.json, before any work: a synthetic cohort
    at another size took seconds to minutes to make before `restore` refused it. A run without config.json is
    checked by `restore`, against the checkpoint it loads anyway."""
    settings = run_settings(out) if (out / CONFIG).exists() else None
    if settings is not None:
        _check_same_run(settings[0], cfg, out / CONFIG)


def load_init(init: str | Path, cfg: Config, nets) -> Path:
    """Load the network weights of checkpoint `init` (a file or a folder: its newest) into `nets`; returns the
    checkpoint's absolute path. Its networks must have the shapes of `cfg`'s."""
    path = find_checkpoint(init).resolve()
    state = load_checkpoint(path)
    saved = Config.from_dict(state["config"])
    changed = [f"{k} {getattr(saved, k)} != {getattr(cfg, k)}" for k in differing(saved, cfg, NETWORK_DEFINING)]
    if changed:
        raise ValueError(
            f"{path}: its networks differ from this run's ({', '.join(changed)}); give the settings it was trained "
            f"with, or start from a checkpoint of networks like these"
        )
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    return path


def restore(
    state: dict, path: Path, cfg: Config, nets: dict[str, nn.Module], opts: dict, batches: Batches, rank: int
) -> int:
    """Load a checkpoint's networks, optimisers and random states (this rank's) to continue `cfg`; returns its
    iteration. Refused when the checkpoint was saved with other run-defining settings."""
    _check_same_run(Config.from_dict(state["config"]), cfg, path)
    if state["iter"] > cfg.iters:
        raise ValueError(
            f"{path}: the run is at iteration {state['iter']}, beyond --iters {cfg.iters}; give --iters "
            f"{state['iter']} or more to continue it"
        )
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    saved_ranks = state.get("rng")
    if isinstance(saved_ranks, list) and rank >= len(saved_ranks):
        raise ValueError(f"{path}: saved by {len(saved_ranks)} process(es); resume it with as many")
    try:
        for k, opt in opts.items():
            opt.load_state_dict(state["optimisers"][k])
        # Generators take their states from host memory; a checkpoint loaded onto a GPU moved them there.
        rng = {k: v.cpu() for k, v in saved_ranks[rank].items()}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{path}: its optimiser or random state is missing or damaged ({type(exc).__name__}), so the run cannot "
            f"continue from it; move it out of {path.parent} to resume from the one before, or start a new run from "
            f"its weights (--init {path})"
        ) from None
    try:
        batches.set_state(rng)
    except (RuntimeError, KeyError) as exc:  # saved on another kind of device: the draws cannot continue exactly
        raise ValueError(f"{path}: its random state is for another device; resume on the device that saved it") from exc
    torch.set_rng_state(rng["torch"])
    device = batches.device
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["iter"])


def write_settings(
    out: Path, cfg: Config, data: str, fov_mm: float, start: int, resume: bool, init: Path | None
) -> None:
    """config.json (with the data and the starting checkpoint); on resume, the log cut back to the checkpoint."""
    started = str(init) if init is not None else init_of(out) if resume else None
    settings = {**cfg.to_dict(), "data": data, "data_digest": data_digest(data), "fov_mm": fov_mm}
    settings.update({"init": started} if started else {})
    with atomic(out / CONFIG) as tmp:
        tmp.write_text(json.dumps(settings, indent=2))
    log_path = out / LOG
    if resume and log_path.exists():  # drop lines written after the checkpoint we resume from
        lines = log_path.read_text(errors="replace").splitlines()
        damaged = [n for n, line in enumerate(lines[:-1], 1) if _logged_iteration(line) == math.inf]
        if damaged:  # the last line may be one cut short by a stop; one before it was damaged since
            warnings.warn(
                f"{log_path}: line {', '.join(map(str, damaged))} damaged (not a record), dropped", stacklevel=2
            )
        kept = [line for line in lines if _logged_iteration(line) <= start]
        with atomic(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _logged_iteration(line: str) -> float:
    """The iteration of one line of metrics.jsonl; infinite for a line cut short by a stop (a full disk, a kill),
    which resuming then drops with the lines after its checkpoint."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def append_log(out: Path, record: dict) -> None:
    """One line of the run's metrics.jsonl."""
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def final_samples_written(out: Path, cfg: Config) -> bool:
    """Whether the finished run's samples are all there (a run killed after its last checkpoint has none)."""
    return all((out / SAMPLES / name).exists() for name in sample_names(cfg.n_fixed))


def finished_run(folder: str | Path, cfg: Config, data: str, init: str | Path | None = None) -> TrainResult | None:
    """The run in `folder`, loaded, if it finished `cfg` on `data` from `init`: its config.json names the same data
    and starting checkpoint, and it holds a checkpoint of iteration `cfg.iters` saved with the same run-defining
    settings. None otherwise."""
    folder, cfg = Path(folder), cfg.validate()
    if saved_config(folder).get("data") != str(Source.parse(data)):
        return None
    if init_of(folder) != _resolved(init):
        return None
    try:
        state = load_checkpoint(checkpoints_of(folder), cfg.iters)
    except FileNotFoundError:  # not trained that far
        return None
    if differing(Config.from_dict(state["config"]), cfg, RUN_DEFINING):
        return None
    nets = build_networks(cfg.model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    device = pick_device(cfg.device)
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
        net.to(device)
    return TrainResult(folder, nets, cfg, float(state["fov_mm"]))


def stopped_run(folder: str | Path, init: str | Path | None = None) -> bool:
    """Whether `folder` holds a run started from `init` with a checkpoint to resume from."""
    return bool(list_checkpoints(checkpoints_of(folder))) and init_of(Path(folder)) == _resolved(init)
