"""The training cache: its format (`volumes.npy`, memory-mappable; `manifest.tsv`, one row per volume;
`rejected.tsv`; `settings.json`), read and checked by `load_cache`, and the synthetic cohort made once into a cache
of that format (`synthetic_cache`). `prepare` writes caches of real data (alphagan/data/prepare.py).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alphagan.config import SIZES
from alphagan.data.space import normalise, synthetic_origin, to_cube
from alphagan.data.synth import make_subject
from alphagan.folders import atomic_folder, check_writable, recover_folder, reserved_array
from alphagan.progress import tqdm
from alphagan.workers import worker_pool

CACHE_VERSION = 2  # 2: the manifest column cube_mm is called fov_mm, like everywhere else
CACHE_FILES = frozenset({"volumes.npy", "manifest.tsv", "rejected.tsv", "settings.json"})


@dataclass(frozen=True)
class Settings:
    """How `prepare` made a cache (settings.json): a cache made otherwise is made again, not reused."""

    size: int = 64
    stretch: bool = False  # resize each axis straight to `size` (the authors' code) instead of padding to a cube
    percentile: float = 99.5  # upper intensity reference inside the brain, mapped to +1
    version: int = CACHE_VERSION


@dataclass
class Entry:
    """One volume of a cache, as its manifest row records it."""

    source: str
    subject: str
    channel: int  # volume index inside a 4-D file (Decathlon), else -1
    shape: str = ""
    spacing: str = ""
    sha256: str = ""
    fov_mm: float = 0.0
    origin: str = ""  # the synthetic cohort of the subject (`space.synthetic_origin`), else empty


MANIFEST_COLUMNS = ("source", "subject", "channel", "sha256", "fov_mm")  # what every reader of a manifest uses


def read_manifest(cache: str | Path) -> list[dict]:
    """The rows of a cache's manifest.tsv; ValueError where a column that readers use is missing or a row is
    damaged."""
    path = Path(cache) / "manifest.tsv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)} column")
            rows = list(reader)
        except csv.Error as exc:
            raise ValueError(f"{path} is not a table ({exc})") from None
    for number, row in enumerate(rows, 2):
        if None in row.values() or not row["channel"].lstrip("-").isdigit():
            raise ValueError(f"{path}: line {number} is damaged")
    return rows


def write_cache_tables(folder: Path, settings: dict, entries: list[Entry], rejected: list[tuple[str, str]]) -> None:
    """A cache's manifest (one row per volume of volumes.npy), rejected.tsv and settings.json."""
    with open(folder / "manifest.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Entry.__dataclass_fields__), delimiter="\t")
        writer.writeheader()
        for entry in entries:
            writer.writerow(asdict(entry))
    with open(folder / "rejected.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["source", "reason"])
        writer.writerows(rejected)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))


def read_settings(cache: str | Path) -> dict:
    """A cache's settings.json; ValueError, naming it, where it is not the settings `prepare` writes."""
    path = Path(cache) / "settings.json"
    try:
        settings = json.loads(path.read_text())
    except ValueError:  # not JSON, or not UTF-8
        settings = None
    size = settings.get("size") if isinstance(settings, dict) else None
    if size not in SIZES or isinstance(size, bool):
        raise ValueError(f"{path}: damaged (no size of {', '.join(map(str, SIZES))}); prepare the cache again")
    return settings


def load_cache(cache: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """The memory-mapped volumes, the manifest rows and the settings of a cache folder, checked against each
    other: a damaged cache is refused here, naming the file, rather than deep inside a model."""
    cache = Path(cache)
    if not cache.is_dir():
        raise FileNotFoundError(f"{cache}: no such folder; prepare a cache with `python -m alphagan prepare`")
    if not (cache / "volumes.npy").exists():
        raise FileNotFoundError(f"{cache}: not a prepared cache (no volumes.npy); run `python -m alphagan prepare`")
    try:
        volumes = np.load(cache / "volumes.npy", mmap_mode="r")
        settings = read_settings(cache)
        manifest = read_manifest(cache)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{cache}: damaged cache ({exc}); prepare it again") from None
    size = settings.get("size")
    if volumes.ndim != 4 or volumes.shape[1:] != (size, size, size):
        raise ValueError(
            f"{cache / 'volumes.npy'}: shape {volumes.shape} but settings.json says {size}³ volumes; prepare the cache "
            f"again (prepare ... --overwrite)"
        )
    if len(manifest) != len(volumes):
        raise ValueError(f"{cache / 'manifest.tsv'}: {len(manifest)} rows for {len(volumes)} volumes; prepare it again")
    if not len(volumes):
        raise ValueError(f"{cache}: the cache holds no volume; prepare it again from a folder of scans")
    fovs = [float(row.get("fov_mm") or "nan") for row in manifest]
    if not all(np.isfinite(f) and f > 0 for f in fovs):
        raise ValueError(f"{cache / 'manifest.tsv'}: a fov_mm that is not a positive number; prepare it again")
    _check_intensities(cache / "volumes.npy", volumes, manifest)
    return volumes, manifest, settings


_CHECKED: set[tuple[str, int, int]] = set()  # (path, mtime, size) of volumes.npy files already checked here


def _check_intensities(path: Path, volumes: np.ndarray, manifest: list[dict], chunk: int = 32) -> None:
    """What `prepare` writes: finite values in [-1, 1], each volume with background at -1. Read in chunks, so a
    large cache is checked in flat memory; once per version of the file in a process (evaluate, for one, loads
    the same cache several times)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _CHECKED:
        return
    # A bar once the check takes a second: a large cache at 128³ is gigabytes read.
    starts = tqdm(range(0, len(volumes), chunk), desc=f"checking {path}", unit="chunk", delay=1.0, leave=False)
    for start in starts:
        block = np.asarray(volumes[start : start + chunk]).reshape(min(chunk, len(volumes) - start), -1)
        finite = np.isfinite(block).all(axis=1)
        low, high = block.min(axis=1), block.max(axis=1)
        for i in range(len(block)):
            subject = manifest[start + i].get("subject", start + i)
            if not finite[i]:
                raise ValueError(f"{path}: volume {start + i} ({subject}) holds NaN or infinite values; prepare again")
            if low[i] < -1.001 or high[i] > 1.001 or abs(low[i] + 1) > 1e-3:
                raise ValueError(
                    f"{path}: volume {start + i} ({subject}) spans {low[i]:.4g} to {high[i]:.4g}, not [-1, 1] with "
                    f"background at -1 (raw intensities?); make caches with `python -m alphagan prepare`"
                )
    _CHECKED.add(key)


def cache_root() -> Path:
    """Where synthetic cohorts are cached: $ALPHAGAN_CACHE, else ~/.cache/alphagan."""
    given = os.environ.get("ALPHAGAN_CACHE")
    root = Path(given or Path.home() / ".cache" / "alphagan")
    where, fix = f"ALPHAGAN_CACHE={given}" if given else str(root), "point ALPHAGAN_CACHE to a folder you can write"
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{where} is a file, not a folder for synthetic cohorts; {fix}, or unset it")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{where}: the folder for synthetic cohorts cannot be made ({exc.strerror}); {fix}") from None
    check_writable(root, fix, name=where)
    return root


def _synthesis_version() -> str:
    """A digest of the code that makes a subject, so that a cache made by other code is never reused."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("synth.py", "space.py", "cache.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def _synth_one(args: tuple[int, int, int, str, str]) -> tuple[int, np.ndarray, float]:
    """Subject `index` preprocessed as `prepare` would do it: synthesised at twice the target resolution (at most
    the 128^3 grid of 1.5 mm voxels, close to the template's own detail), then trimmed, padded and resized like
    real data."""
    index, seed, size, kind, contrast = args
    subject = make_subject(index, seed=seed, size=min(2 * size, 128), kind=kind, contrast=contrast)
    cube, fov_mm = to_cube(subject.volume, np.abs(np.diag(subject.affine)[:3]), size)
    return index, normalise(cube), fov_mm


def _one_thread() -> None:
    torch.set_num_threads(1)  # one process per core: threads inside each would only compete


def synthetic_cache(
    n: int,
    size: int,
    seed: int = 0,
    kind: str = "normal",
    contrast: str = "t1",
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """The cache folder of a synthetic cohort, made once (in parallel processes) and reused by every later call
    with the same settings. It has the layout of a `prepare` cache, so `load_cache` reads it."""
    folder = cache_root() / f"synth-{kind}-{contrast}-{size}-n{n}-seed{seed}-{_synthesis_version()}"
    if (folder / "settings.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder, prefix=".synth-")  # any cohort's partial folders, not only this one's
    # Shown at once: reserving a large cohort's space and its first subject take seconds before the first update.
    bar = tqdm(total=n, desc=f"synthetic cohort {kind} {contrast}", unit="subj", disable=not progress)
    # Another process making the same cohort may finish first: its folder is kept (`replace=False`).
    with bar, atomic_folder(folder, replace=False) as tmp:
        volumes = reserved_array(tmp / "volumes.npy", (n, size, size, size))
        fovs = [0.0] * n
        jobs = [(i, seed, size, kind, contrast) for i in range(n)]
        workers = max(1, min(workers or os.cpu_count() or 1, n))
        # Subject 0 here first: it loads the template, which forked workers then inherit instead of reading it.
        first = _synth_one(jobs[0])
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with worker_pool(workers, _one_thread, multiprocessing.get_context(method)) as pool:
            chunk = max(1, n // (8 * workers))
            rest = pool.map(_synth_one, jobs[1:], chunksize=chunk) if pool else map(_synth_one, jobs[1:])
            # Written as they arrive: the cohort is never held in memory.
            for index, volume, fov_mm in itertools.chain([first], rest):
                volumes[index], fovs[index] = volume, fov_mm
                bar.update()
        bar.close()
        volumes.flush()
        del volumes
        source = f"synth:{kind}:{contrast}:seed{seed}"
        origin = synthetic_origin(kind, seed)
        entries = [Entry(source, f"sub-{i:05d}", -1, fov_mm=fov_mm, origin=origin) for i, fov_mm in enumerate(fovs)]
        settings = {**asdict(Settings(size=size)), "synthetic": dict(kind=kind, contrast=contrast, seed=seed, n=n)}
        write_cache_tables(tmp, settings, entries, [])
    return folder
