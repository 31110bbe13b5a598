"""Preprocessing as the paper did it, for any folder of NIfTI or FreeSurfer files, into one cache.

Each volume is read with nibabel (scaling slopes honoured), reoriented to RAS, checked, trimmed of all-zero
planes, padded to a cube in millimetres (so the brain keeps its proportions; stretching to a cube, as the
authors' code did, stays an option), resized to S^3 with anti-aliasing and normalised to [-1, 1] with the
background at -1. The cache is one `volumes.npy` (N, S, S, S) float32 array that `np.load(mmap_mode="r")`
maps without reading, a `manifest.tsv` (source, subject, original shape and spacing, SHA-256), `settings.json`
and `rejected.tsv`. It is replaced only when a run completes.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

LAYOUTS = ("auto", "flat", "brats", "adni", "atlas", "ixi", "decathlon")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz")
DECATHLON_CHANNELS = {"flair": 0, "t1": 1, "t1gd": 2, "t2": 3}
MIN_BRAIN_EXTENT_MM = 50.0  # a brain is at least this long on every axis (adult brains: 140-180 mm)
CACHE_VERSION = 1


class InputError(ValueError):
    """A file that cannot be used, with the plain reason."""


@dataclass(frozen=True)
class Settings:
    size: int = 64
    stretch: bool = False  # resize each axis straight to `size` (the authors' code) instead of padding to a cube
    percentile: float = 99.5  # upper intensity reference inside the brain, mapped to +1
    version: int = CACHE_VERSION


@dataclass
class Entry:
    source: str
    subject: str
    channel: int  # volume index inside a 4-D file (Decathlon), else -1
    shape: str = ""
    spacing: str = ""
    sha256: str = ""
    cube_mm: float = 0.0


# ---------------------------------------------------------------------------------------------- finding files
def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_layout(root: Path) -> str:
    """Guess the layout of a folder from its file names."""
    if any(root.rglob("brainmask.mgz")):
        return "adni"
    if (root / "imagesTr").is_dir() and (root / "dataset.json").exists():
        return "decathlon"
    images = [p for p in root.rglob("*") if _is_image(p)]
    names = [p.name for p in images]
    if any(re.match(r"IXI\d+-\w+-\d+-(T1|T2|PD|MRA|DTI)", n) for n in names):
        return "ixi"
    # BraTS: <subject>/<subject>_flair.nii.gz, ... (the folder name starts the file name)
    if any(re.fullmatch(rf"{re.escape(p.parent.name)}_(flair|t1|t1ce|t2)", _stem(p), re.I) for p in images):
        return "brats"
    if any(re.search(r"T1w\.nii", n) for n in names):
        return "atlas"
    return "flat"


def find_inputs(src: str, layout: str = "auto", modality: str | None = None) -> list[Entry]:
    """The input volumes of `src` (a folder or a glob pattern) for `layout` and `modality`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if any(ch in src for ch in "*?["):
        return [
            Entry(str(Path(p)), _stem(Path(p)), -1)
            for p in sorted(glob.glob(src, recursive=True))
            if _is_image(Path(p))
        ]
    root = Path(src)
    if root.is_file():
        return [Entry(str(root), _stem(root), -1)]
    if not root.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder")
    layout = detect_layout(root) if layout == "auto" else layout
    mod = (modality or "").lower()
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if layout == "flat":
        return [Entry(str(p), _stem(p), -1) for p in files if mod in p.name.lower()]
    if layout == "adni":
        return [Entry(str(p), p.parent.parent.name, -1) for p in files if p.name == "brainmask.mgz"]
    if layout == "brats":
        mod = mod or "flair"
        return [Entry(str(p), p.parent.name, -1) for p in files if _stem(p).lower().endswith(f"_{mod}")]
    if layout == "ixi":
        mod = (mod or "t1").upper()
        out = []
        for p in files:
            m = re.match(r"(IXI\d+-\w+-\d+)-(\w+)$", _stem(p))
            if m and m.group(2).upper() == mod:
                out.append(Entry(str(p), m.group(1), -1))
        return out
    if layout == "atlas":
        skip = re.compile(r"(mask|label|lesion|seg)", re.I)
        return [Entry(str(p), _stem(p).split("_")[0], -1) for p in files if "T1w" in p.name and not skip.search(p.name)]
    # decathlon: 4-D images with channels FLAIR, T1w, T1gd, T2w under imagesTr/
    mod = mod or "flair"
    if mod not in DECATHLON_CHANNELS:
        raise ValueError(f"decathlon modality must be one of {sorted(DECATHLON_CHANNELS)}, got {mod!r}")
    return [
        Entry(str(p), _stem(p), DECATHLON_CHANNELS[mod])
        for p in files
        if p.parent.name == "imagesTr" and not p.name.startswith(".")
    ]


# ---------------------------------------------------------------------------------------------- one volume
def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_ras(path: str | Path, channel: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The volume of `path` as float32 in RAS orientation, and its voxel sizes in mm.

    Raises InputError, naming the reason, for anything that is not one usable 3-D image.
    """
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"not a readable NIfTI/MGH image ({type(exc).__name__}: {exc})") from None
    shape = img.shape
    if len(shape) == 4 and channel >= 0:
        if channel >= shape[3]:
            raise InputError(f"has {shape[3]} volumes, channel {channel} asked for")
        img = img.slicer[..., channel]
    elif len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) == 4:
        raise InputError(f"4-D image with {shape[3]} volumes (shape {shape}); one 3-D volume expected")
    if len(img.shape) != 3 or min(img.shape) < 2:
        raise InputError(f"not a 3-D volume (shape {shape})")
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # truncated gzip, short data block
        raise InputError(
            f"image data cannot be read, the file may be truncated ({type(exc).__name__}: {exc})"
        ) from None
    spacing = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"invalid voxel sizes {spacing.tolist()}")
    return data, spacing


def check_volume(data: np.ndarray, spacing: np.ndarray) -> None:
    """Raise InputError if the voxels cannot be a brain volume."""
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"{bad} voxels are NaN or infinite")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError("all-zero volume" if hi == 0 else f"constant volume (every voxel is {hi:g})")
    extent = _foreground_extent_mm(data, spacing)
    if np.any(extent < MIN_BRAIN_EXTENT_MM):
        raise InputError(
            f"too small to be a brain: the non-zero region measures "
            f"{' x '.join(f'{e:.0f}' for e in extent)} mm (at least {MIN_BRAIN_EXTENT_MM:.0f} mm per axis expected)"
        )


def _foreground_extent_mm(data: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    box = bounding_box(data)
    return np.array([(b.stop - b.start) * s for b, s in zip(box, spacing)])


def bounding_box(data: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box that leaves out only all-zero planes."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(np.any(data != 0, axis=other))
        box.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    return tuple(box)


def to_cube(data: np.ndarray, spacing: np.ndarray, size: int, stretch: bool = False) -> tuple[np.ndarray, float]:
    """Trim all-zero planes, then resize to `size`^3 keeping physical proportions (pad to a cube in mm).

    Returns the cube and its edge in mm. With `stretch`, each axis is resized straight to `size`.
    """
    from skimage.transform import resize

    trimmed = data[bounding_box(data)]
    extent = np.array(trimmed.shape) * spacing
    if stretch:
        shape = (size, size, size)
    else:
        voxel = extent.max() / size
        shape = tuple(int(min(size, max(1, round(e / voxel)))) for e in extent)
    # order=1 with a Gaussian pre-filter where we shrink (anti-aliasing); a shrunken brain keeps a zero border.
    resized = resize(
        trimmed, shape, order=1, mode="constant", cval=0.0, anti_aliasing=True, preserve_range=True
    ).astype(np.float32)
    if stretch:
        return resized, float(extent.max())
    cube = np.zeros((size, size, size), dtype=np.float32)
    start = [(size - n) // 2 for n in shape]
    cube[tuple(slice(s, s + n) for s, n in zip(start, shape))] = resized
    return cube, float(extent.max())


def normalise(cube: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Map 0 (background) to -1 and the `percentile` of the brain's voxels to +1, clipping above."""
    foreground = cube[cube > 0]
    if foreground.size == 0:
        raise InputError("no voxel above zero: intensities must be non-negative with a zero background")
    top = float(np.percentile(foreground, percentile))
    return (np.clip(cube / top, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def preprocess(path: str | Path, settings: Settings = Settings(), channel: int = -1) -> tuple[np.ndarray, dict]:
    """One file to one normalised `size`^3 cube, with what the manifest records about it."""
    data, spacing = load_ras(path, channel)
    check_volume(data, spacing)
    np.maximum(data, 0.0, out=data)  # negative intensities are background-side noise in brain-masked MRI
    cube, cube_mm = to_cube(data, spacing, settings.size, settings.stretch)
    info = {
        "shape": "x".join(map(str, data.shape)),
        "spacing": "x".join(f"{s:.4g}" for s in spacing),
        "cube_mm": round(cube_mm, 3),
    }
    return normalise(cube, settings.percentile), info


def _work(args: tuple[Entry, Settings]) -> tuple[Entry, np.ndarray | None, str]:
    entry, settings = args
    try:
        volume, info = preprocess(entry.source, settings, entry.channel)
    except InputError as exc:
        return entry, None, str(exc)
    except OSError as exc:
        return entry, None, f"cannot be read ({exc.strerror or exc})"
    entry.shape, entry.spacing, entry.cube_mm = info["shape"], info["spacing"], info["cube_mm"]
    return entry, volume, ""


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class PrepareResult:
    out: Path
    written: int
    reused: int
    rejected: list[tuple[str, str]]


def _read_previous(out: Path, settings: Settings) -> dict[tuple[str, int, str], tuple[np.ndarray, dict]]:
    """Volumes and manifest rows of an earlier run with the same settings, keyed by (source, channel, checksum)."""
    try:
        previous = json.loads((out / "settings.json").read_text())
        if previous != asdict(settings):
            return {}
        volumes = np.load(out / "volumes.npy", mmap_mode="r")
        rows = read_manifest(out)
    except (OSError, ValueError):
        return {}
    return {(r["source"], int(r["channel"]), r["sha256"]): (volumes[i], r) for i, r in enumerate(rows)}


def read_manifest(cache: str | Path) -> list[dict]:
    with open(Path(cache) / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def prepare(
    src: str,
    out: str | Path,
    size: int = 64,
    layout: str = "auto",
    modality: str | None = None,
    stretch: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Preprocess every input of `src` into the cache folder `out`; see the module docstring."""
    from tqdm.auto import tqdm

    settings = Settings(size=size, stretch=stretch)
    out = Path(out)
    entries = find_inputs(src, layout, modality)
    if not entries:
        raise FileNotFoundError(f"{src}: no input images found (layout {layout!r}, modality {modality!r})")
    previous = _read_previous(out, settings)

    results: list[tuple[Entry, np.ndarray | None, str]] = []
    todo = []
    reused = 0
    for entry in entries:
        try:
            digest = sha256(entry.source)
        except OSError:
            digest = ""
        key = (entry.source, entry.channel, digest)
        entry.sha256 = digest  # computed once; the workers reuse it
        if key in previous:
            volume, row = previous[key]
            entry.shape, entry.spacing, entry.cube_mm = row["shape"], row["spacing"], float(row["cube_mm"])
            results.append((entry, np.array(volume), ""))
            reused += 1
        else:
            todo.append(entry)

    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    bar = tqdm(total=len(todo), desc="prepare", unit="vol", disable=not progress)
    if workers == 1:
        for entry in todo:
            results.append(_work((entry, settings)))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_work, [(e, settings) for e in todo], chunksize=1):
                results.append(result)
                bar.update()
    bar.close()

    order = {(e.source, e.channel): i for i, e in enumerate(entries)}
    results.sort(key=lambda r: order[(r[0].source, r[0].channel)])
    good = [(e, v) for e, v, _ in results if v is not None]
    rejected = [(e.source, reason) for e, v, reason in results if v is None]
    for source, reason in rejected:
        print(f"rejected {source}: {reason}", file=sys.stderr)
    if not good:
        raise RuntimeError(f"{src}: none of the {len(entries)} inputs could be used; see the reasons above")
    _write_cache(out, settings, good, rejected)
    return PrepareResult(out, len(good) - reused, reused, rejected)


def _write_cache(
    out: Path, settings: Settings, good: list[tuple[Entry, np.ndarray]], rejected: list[tuple[str, str]]
) -> None:
    """Write the whole cache into a temporary folder, then swap it in place of `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_cache_files(tmp, settings, good, rejected)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _write_cache_files(
    folder: Path, settings: Settings, good: list[tuple[Entry, np.ndarray]], rejected: list[tuple[str, str]]
) -> None:
    volumes = np.lib.format.open_memmap(
        folder / "volumes.npy",
        mode="w+",
        dtype=np.float32,
        shape=(len(good), settings.size, settings.size, settings.size),
    )
    for i, (_, volume) in enumerate(good):
        volumes[i] = volume
    volumes.flush()
    del volumes
    with open(folder / "manifest.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Entry.__dataclass_fields__), delimiter="\t")
        writer.writeheader()
        for entry, _ in good:
            writer.writerow(asdict(entry))
    with open(folder / "rejected.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["source", "reason"])
        writer.writerows(rejected)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2))


def load_cache(cache: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """The memory-mapped volumes, the manifest rows and the settings of a cache folder."""
    cache = Path(cache)
    if not (cache / "volumes.npy").exists():
        raise FileNotFoundError(f"{cache}: not a prepared cache (no volumes.npy); run `python -m alphagan prepare`")
    volumes = np.load(cache / "volumes.npy", mmap_mode="r")
    settings = json.loads((cache / "settings.json").read_text())
    return volumes, read_manifest(cache), settings
