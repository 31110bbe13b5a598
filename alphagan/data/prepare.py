"""Preprocessing as the paper did it, for any folder of NIfTI or FreeSurfer files, into one cache.

Taught in notebook 01.

Each volume is read with nibabel (scaling slopes honoured), reoriented to RAS (an oblique one resampled onto the
world axes), checked, trimmed of all-zero planes, padded to a cube in millimetres (so the brain keeps its
proportions; stretching to a cube, as the authors' code did, stays an option), resized to S^3 with anti-aliasing and
normalised to [-1, 1] with the background at -1. The cache is one `volumes.npy` (N, S, S, S) float32 array that
`np.load(mmap_mode="r")` maps without reading, a `manifest.tsv` (source, subject, original shape and spacing,
SHA-256, and the synthetic cohort a subject of `synth` comes from), `settings.json` and `rejected.tsv`. It is
replaced only when a run completes. `prepare` writes only into a folder that is absent, empty or a cache of its own
(one of other settings only with `overwrite`), never into the folder of its inputs, and one run at a time per cache
(a lock file beside it); volumes stream into the array as they are made, so memory does not grow with the cohort.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import nibabel.affines
import nibabel.processing
import numpy as np
from scipy import ndimage

from alphagan.config import LAYOUTS, SIZES, check
from alphagan.data.cache import CACHE_FILES, Entry, Settings, read_manifest, write_cache_tables
from alphagan.data.space import GENERATED_MARK, InputError, bounding_box, normalise, origin_of, to_cube
from alphagan.folders import (
    LOCK,
    MANIFEST,
    FolderRefused,
    atomic_folder,
    check_claim,
    check_writable,
    followed,
    recover_folder,
    reserved_array,
    shown_names,
    take_lock,
)
from alphagan.progress import tqdm
from alphagan.workers import worker_pool

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz")
DECATHLON_CHANNELS = {"flair": 0, "t1": 1, "t1gd": 2, "t2": 3}
# A contrast named in a file name (a word of it, BIDS or BraTS or IXI style), and the contrast it names.
CONTRAST_WORDS = {
    **dict.fromkeys(("t1", "t1w", "t1n", "mprage"), "t1"),  # t1n, t1c, t2w, t2f: BraTS 2023's names
    **dict.fromkeys(("t1ce", "t1gd", "t1c"), "t1ce"),
    **dict.fromkeys(("t2", "t2w"), "t2"),
    **dict.fromkeys(("flair", "t2flair", "t2f"), "flair"),
    **dict.fromkeys(("pd", "pdw"), "pd"),
}
MAX_VOXELS = 512**3  # a header promising more is refused before its data are read (1 mm brains: about 8 M voxels)
MIN_BRAIN_EXTENT_MM = 50.0  # a brain is at least this long on every axis (adult brains: 140-180 mm)
MAX_BRAIN_EXTENT_MM = 400.0  # a head scan's whole field of view, neck included, is shorter than this on every axis
MAX_UPSAMPLING = 2.0  # a scan's voxels may be at most this many times the cube's on an axis (`check_resolution`)
SAME_IMAGE = 0.01  # prepared volumes this close at every voxel (of [-1, 1]) are one image (`_same_images`)
LABEL_VALUES = 16  # a volume of at most this many distinct values is a label map or a mask, not an intensity image
# A scan tilted more than this from the world axes is resampled onto them (`load_ras`). Measured on a synthetic
# subject at 3 mm, tilted and prepared at 32³ (correlation with the straight scan's cube): kept tilted 0.97 at 3°,
# 0.94 at 10°, 0.84 at 30°; resampled 0.95, 0.95, 0.94 (tests/test_faults.py checks 30°).
OBLIQUE_DEGREES = 5.0
UNIT_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}  # NIfTI's spatial units; unknown: mm


# ---------------------------------------------------------------------------------------------- finding files
def _is_image(path: Path) -> bool:
    """A NIfTI or MGH file, not hidden (a writer's temporary file, `folders.atomic`'s, starts with a dot)."""
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


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


def _is_pattern(src: str) -> bool:
    """A glob pattern, unless a file or folder of that very name exists (`study[1]` is a folder, not a pattern)."""
    return glob.has_magic(src) and not Path(src).exists()


def walk_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted, following symlinked folders but entering each real folder once: a link
    back to a parent is never walked in a loop."""
    seen, files = set(), []
    # A count of the folders walked, shown once a walk takes a second (a --src of a whole disk takes minutes).
    with tqdm(desc=f"looking for images under {root}", unit=" folders", delay=1.0, leave=False) as bar:
        for folder, subfolders, names in os.walk(root, followlinks=True):
            bar.update()
            real = os.path.realpath(folder)
            if real in seen:
                subfolders.clear()
                continue
            seen.add(real)
            subfolders.sort()
            files += [Path(folder) / n for n in names]
    return sorted(files)


def _part_regex(part: str) -> str:
    """One path component of a glob pattern as a regular expression: `*` and `?` never cross a `/`."""
    out, i = [], 0
    while i < len(part):
        c, i = part[i], i + 1
        close = part.find("]", i + 1) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close > 0:
            body = part[i:close]
            body = body.replace("\\", "\\\\").replace("[", "\\[")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _pattern_files(src: str) -> list[Path]:
    """The files a glob pattern names (`*`, `?`, `[...]` within a name; `**` across folders), found by
    `walk_files` from the pattern's fixed start, so a pattern never walks a symlink loop either."""
    parts = Path(src).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    regex = "".join("(?:[^/]+/)*" if part == "**" else _part_regex(part) + "/" for part in parts[fixed:])
    pattern = re.compile(regex.removesuffix("/") + r"\Z", re.S)
    return [p for p in walk_files(root) if pattern.match(p.relative_to(root).as_posix())] if root.is_dir() else []


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".7z", ".rar")
OTHER_FORMATS = {".dcm": "DICOM", ".ima": "DICOM", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
                 ".mhd": "MetaImage", ".img": "Analyze", ".hdr": "Analyze", ".par": "Philips PAR/REC"}  # fmt: skip


def _other_format(path: Path) -> str | None:
    """The image format `prepare` does not read that the name of `path` says (`OTHER_FORMATS`), else None."""
    name = path.name.lower()
    return next((f for suffix, f in OTHER_FORMATS.items() if name.endswith(suffix)), None)


def _format_of(path: Path) -> str | None:
    """The name of a format `prepare` does not read, judged by suffix (and DICOM's magic bytes), else None."""
    name = path.name.lower()
    if name.endswith(ARCHIVES):
        return "archive"
    if other := _other_format(path):
        return other
    try:
        with open(path, "rb") as f:
            return "DICOM" if f.read(132)[128:] == b"DICM" else None
    except OSError:
        return None


def why_no_inputs(src: str, layout: str = "auto", modality: str | None = None) -> str:
    """Why `src` gave no input for `layout` and `modality`: what it holds instead of NIfTI/MGH volumes, or which
    volumes the two left out; and what to do about it."""
    root = Path(src)
    if _is_pattern(src):
        files = _pattern_files(src)
        if not files:
            return "no file matches this pattern"
    elif root.is_dir():
        files = walk_files(root)[:2000]
    else:
        files = [root] if root.is_file() else []
    images = [p for p in files if _is_image(p)]
    if images:
        return (
            f"it holds {len(images)} NIfTI/MGH file(s) (e.g. {images[0].name}), none of which --layout {layout} and "
            f"--modality {modality or '(none)'} select; check them, or leave them out"
        )
    formats = {f for f in map(_format_of, files) if f}
    if "archive" in formats:
        return "it holds an archive (zip/tar); unpack it and give the folder as --src"
    if "DICOM" in formats:
        return "it holds DICOM files; convert them to NIfTI first (dcm2niix -z y -o OUT IN) and give that folder"
    if formats:
        return f"it holds {', '.join(sorted(formats))} files; convert them to NIfTI (.nii.gz) first"
    return "no .nii, .nii.gz, .mgh or .mgz files under it"


def files_of(src: str) -> list[Path]:
    """Every file `src` names: those a glob pattern matches, those under a folder, or the one file."""
    if _is_pattern(src):
        return _pattern_files(src)
    root = Path(src)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder; check --src")
    return walk_files(root)


def unread_files(files: list[Path]) -> list[tuple[Path, str]]:
    """The files among `files` in an image format `prepare` does not read (judged by suffix), with that format."""
    return [(p, f) for p in files if (f := _other_format(p)) and not p.name.startswith(".")]


def broken_links(files: list[Path]) -> list[Path]:
    """The links among `files` named as images that lead to no file (a moved or unmounted target)."""
    return [p for p in files if p.name.lower().endswith(IMAGE_SUFFIXES) and p.is_symlink() and not p.exists()]


def find_inputs(
    src: str, layout: str = "auto", modality: str | None = None, files: list[Path] | None = None
) -> list[Entry]:
    """The input volumes of `src` (a folder or a glob pattern) for `layout` and `modality`; `files`: `files_of(src)`,
    if already walked."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    files = files_of(src) if files is None else files
    if _is_pattern(src):
        return _one_contrast(src, [p for p in files if _is_image(p)], modality)
    root = Path(src)
    if root.is_file():
        if not _is_image(root):
            raise ValueError(f"{src}: not a NIfTI or MGH volume; {why_no_inputs(src)}")
        return [Entry(str(root), _stem(root), -1)]
    layout = detect_layout(root) if layout == "auto" else layout
    mod = (modality or "").lower()
    files = [p for p in files if _is_image(p)]
    if layout == "flat":
        return _one_contrast(src, files, modality)
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


def contrast_of(path: Path) -> str | None:
    """The contrast a file's name says (`CONTRAST_WORDS`), or None where it says none, or more than one."""
    said = {CONTRAST_WORDS[w] for w in re.split(r"[_\-.]", _stem(path).lower()) if w in CONTRAST_WORDS}
    return said.pop() if len(said) == 1 else None


def _one_contrast(src: str, files: list[Path], modality: str | None) -> list[Entry]:
    """The entries of `files` (a flat folder or a pattern) of one contrast: `modality`'s (a contrast word, or any
    part of a file's name), or, without it, the only contrast their names say. Scans of several contrasts in one
    cache would train one model on a mixture, each subject counted once per contrast."""
    mod = (modality or "").lower()

    def taken(path: Path) -> bool:
        contrast = contrast_of(path)
        if mod in CONTRAST_WORDS and contrast is not None:  # the word itself: "t1" is not part of "t1ce"
            return contrast == CONTRAST_WORDS[mod]
        return mod in path.name.lower()

    chosen = [p for p in files if taken(p)]
    counts = contrasts_of(chosen)
    if mixed := mixed_contrasts(counts):
        raise ValueError(
            f"{src}: holds {mixed}; a cache holds one, so that a model learns one contrast and counts each subject "
            f"once: give --modality {' or --modality '.join(sorted(filter(None, counts)))}"
        )
    return [Entry(str(p), _stem(p), -1) for p in chosen]


def contrasts_of(paths: list[Path]) -> collections.Counter:
    """How many of `paths` each contrast names (`contrast_of`; None: no contrast said)."""
    return collections.Counter(contrast_of(p) for p in paths)


def cache_contrasts(cache: Path) -> collections.Counter:
    """`contrasts_of` the inputs a cache was prepared from (its manifest's sources): a cache records no contrast."""
    return contrasts_of([Path(row["source"]) for row in read_manifest(cache)])


def mixed_contrasts(counts: collections.Counter) -> str | None:
    """What scans hold whose names say more than one contrast (`contrasts_of`): "scans of 2 contrasts by their
    names (3 t1, 3 t2)"; else None."""
    counts = {c: n for c, n in counts.items() if c is not None}
    if len(counts) < 2:
        return None
    said = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return f"scans of {len(counts)} contrasts by their names ({said})"


# ---------------------------------------------------------------------------------------------- one volume
def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Repairs(logging.Handler):
    """What nibabel says it repaired while reading a header, kept instead of printed."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


def _load(path: str | Path):
    """nibabel's image of `path`, and what nibabel repaired in its header on the way (it would print that, and
    a zero pixdim repaired to 1 mm makes a wrong brain: `_check_affine` refuses it)."""
    logger, repairs = nib.imageglobals.logger, _Repairs()
    handlers, logger.handlers = logger.handlers, [repairs]
    try:
        return nib.load(str(path)), repairs.said
    finally:
        logger.handlers = handlers


def _unreadable(path: Path) -> str:
    """Why nibabel could not open `path`, in our words."""
    with open(path, "rb") as f:
        start = f.read(2)
    if not start:
        return "an empty file (0 bytes); copy it again"
    suffix = path.suffix.lower()
    if suffix in (".gz", ".mgz") and start != b"\x1f\x8b":
        fix = "without the .gz" if suffix == ".gz" else ".mgh"
        return f"named {path.suffix} but not gzip-compressed; rename it {fix}"
    if suffix in (".nii", ".mgh") and start == b"\x1f\x8b":
        fixed = path.name + ".gz" if suffix == ".nii" else path.name[:-1] + "z"  # .mgz: a compressed .mgh
        return f"gzip-compressed but named {path.suffix}; rename it {fixed}"
    return "not a readable NIfTI/MGH image: truncated, damaged or of another format"


def load_ras(path: str | Path, channel: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The volume of `path` as float32 in RAS orientation, and its voxel sizes in mm.

    Raises InputError, naming the reason, for anything that is not one usable 3-D image.
    """
    try:
        img, repaired = _load(path)
    except Exception:  # nibabel raises many types for unreadable files
        raise InputError(_unreadable(Path(path))) from None
    shape = img.shape
    while len(img.shape) > 4 and img.shape[-1] == 1:  # a converter's (x, y, z, 1, 1): one volume
        img = img.slicer[..., 0]
    if len(img.shape) == 4 and channel >= 0:
        if channel >= shape[3]:
            raise InputError(f"has {shape[3]} volumes, channel {channel} asked for")
        img = img.slicer[..., channel]
    elif len(img.shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(img.shape) == 4:
        raise InputError(
            f"4-D image with {shape[3]} volumes (shape {shape}); one 3-D volume expected: save the one to use as its "
            f"own file (Decathlon's 4-D images: --layout decathlon)"
        )
    if len(img.shape) != 3 or min(img.shape) < 2:
        raise InputError(f"not a 3-D volume (shape {shape}): a slice or a picture; give the whole 3-D scan")
    if int(np.prod(img.shape, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"its header says {img.shape} voxels, above the limit of {MAX_VOXELS:,} (512³)")
    _check_affine(img, repaired)
    if img.get_data_dtype().kind == "c":
        raise InputError("complex-valued voxels (phase and magnitude); give the magnitude image")
    if img.get_data_dtype().kind == "V":
        raise InputError("colour (RGB) voxels, a picture rather than a scan; give the grey-scale image")
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception:  # truncated gzip, short data block
        raise InputError("its image data ends early or is damaged (a truncated copy?); copy the file again") from None
    if obliquity(img.affine) > OBLIQUE_DEGREES:
        img = _straightened(nib.Nifti1Image(data, img.affine, img.header if isinstance(img, nib.Nifti1Image) else None))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    # The voxel sizes of the affine that the NIfTI rules choose (sform, else qform, else pixdim; nibabel's
    # `affine`), which also decided the orientation: pixdim alone may disagree with it.
    spacing = nib.affines.voxel_sizes(img.affine) * _unit_mm(img)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"invalid voxel sizes {spacing.tolist()}")
    return data, spacing


def obliquity(affine: np.ndarray) -> float:
    """Degrees between the voxel axes of `affine` and the nearest world axes: 0 for a scan aligned with them."""
    directions = affine[:3, :3] / nib.affines.voxel_sizes(affine)
    return float(np.degrees(np.arccos(np.clip(np.abs(directions).max(axis=0), 0.0, 1.0))).max())


def _straightened(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """An oblique scan resampled (linearly, zero outside) onto a grid aligned with the world axes and of its own voxel
    sizes: trimming and resizing work on array axes, which would otherwise keep its tilt in the training volume."""
    sizes = nib.affines.voxel_sizes(img.affine)
    return nib.processing.resample_to_output(img, voxel_sizes=sizes, order=1, mode="constant", cval=0.0)


def _unit_mm(img) -> float:
    """Millimetres per unit of the header's affine: NIfTI states its spatial unit (metres, mm, microns)."""
    units = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "mm"
    return UNIT_MM.get(units, 1.0)


def _check_affine(img, repaired: list[str]) -> None:
    """Refuse a header whose voxel-to-world affine cannot be trusted, with the reason (`repaired`: what nibabel
    repaired while reading it)."""
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        raise InputError(
            "its affine (sform/qform) holds NaN or infinite values; fix the header (e.g. nibabel's set_sform) or "
            "export the image again"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("its affine (sform/qform) is singular: the voxels have no size or orientation")
    header = img.header
    no_codes = isinstance(header, nib.Nifti1Header) and header["sform_code"] == 0 and header["qform_code"] == 0
    if no_codes and any("pixdim" in text and "non-zero" in text for text in repaired):  # nibabel took 1 mm for them
        raise InputError(
            "no sform or qform, and a voxel size of 0 in its pixdim; fix the header (pixdim[1:4]: voxel sizes in mm)"
        )


def _descrip(path: Path) -> str:
    """The text of a NIfTI header's descrip field; empty for other formats, and for unreadable files, which
    `load_ras` reports with their reason."""
    try:
        descrip = _load(path)[0].header.get("descrip")
    except Exception:
        return ""
    if descrip is None:
        return ""
    return bytes(np.asarray(descrip).tobytes()).split(b"\0")[0].decode("utf-8", "replace")


def generated_reason(path: str | Path, descrip: str | None = None) -> str | None:
    """Why `path` is a model's output rather than a scan, or None: its NIfTI header says so (`GENERATED_MARK`;
    `descrip`: the header's text, if already read), or its folder is one that `sample` or `train` wrote
    (`folders.MANIFEST`)."""
    path = Path(path)
    if (_descrip(path) if descrip is None else descrip).startswith(GENERATED_MARK):
        return f"generated by a model (its header says {GENERATED_MARK!r})"
    for folder in (path.parent, path.parent.parent):
        try:
            command = json.loads((folder / MANIFEST).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            continue
        if command in ("sample", "train"):
            return f"generated by a model (written by `alphagan {command}` into {folder})"
    return None


def nan_background(data: np.ndarray) -> np.ndarray:
    """`data` with a NaN background set to 0: NaN voxels that all reach the image's edge through NaN, as masked images
    from FSL or SPM hold them outside the brain. NaN elsewhere (holes in the brain), or an infinite voxel, is left
    for `check_volume` to refuse."""
    missing = np.isnan(data)
    if not missing.any():
        return data
    labels, _ = ndimage.label(missing)
    edge = np.unique(np.concatenate([labels[i].ravel() for i in _faces(data.ndim)]))
    if np.isin(labels, edge[edge > 0], invert=True)[missing].any():  # a NaN that does not reach the edge
        return data
    return np.where(missing, np.float32(0), data)


def _faces(ndim: int) -> list[tuple]:
    """Index tuples of the first and last slice along each axis."""
    return [tuple([slice(None)] * axis + [end]) for axis in range(ndim) for end in (0, -1)]


def check_volume(data: np.ndarray, spacing: np.ndarray) -> None:
    """Raise InputError if the voxels cannot be a brain volume."""
    infinite, missing = int(np.count_nonzero(np.isinf(data))), int(np.count_nonzero(np.isnan(data)))
    if infinite:
        raise InputError(f"{infinite} voxels are infinite; fill them with finite values, or leave the file out")
    if missing:
        raise InputError(
            f"{missing} voxels are NaN within the image (a NaN background, reaching the image's edge, is read as 0); "
            f"fill them, or leave the file out"
        )
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError("all-zero volume" if hi == 0 else f"constant volume (every voxel is {hi:g})")
    extent = _foreground_extent_mm(data, spacing)
    measures = f"the non-zero region measures {' x '.join(f'{e:.0f}' for e in extent)} mm"
    if np.any(extent < MIN_BRAIN_EXTENT_MM):
        raise InputError(
            f"too small to be a brain: {measures} (at least {MIN_BRAIN_EXTENT_MM:.0f} mm per axis expected)"
        )
    if np.any(extent > MAX_BRAIN_EXTENT_MM):
        raise InputError(
            f"too large to be a head: {measures} (at most {MAX_BRAIN_EXTENT_MM:.0f} mm per axis expected); its voxel "
            f"sizes or spatial unit (pixdim, xyzt_units) are wrong"
        )


def _cube_voxel_mm(extent: np.ndarray, size: int, stretch: bool) -> np.ndarray:
    """The edge of a cube voxel on each axis once a brain of `extent` mm is made a `size`^3 cube (`to_cube`)."""
    return extent / size if stretch else np.full(3, extent.max() / size)


def check_resolution(data: np.ndarray, spacing: np.ndarray, settings: Settings) -> None:
    """Refuse a scan whose voxels are more than `MAX_UPSAMPLING` times as coarse as the cube's on some axis (thick
    slices, a low-resolution scout): resizing it up would put blur, not anatomy, into the training set."""
    extent = _foreground_extent_mm(data, spacing)
    coarse = spacing / _cube_voxel_mm(extent, settings.size, settings.stretch)
    if coarse.max() <= MAX_UPSAMPLING:
        return
    axis = int(coarse.argmax())
    fits = [s for s in SIZES if (spacing / _cube_voxel_mm(extent, s, settings.stretch)).max() <= MAX_UPSAMPLING]
    fix = f"prepare at --size {fits[-1]} or leave it out" if fits else "leave it out"
    raise InputError(
        f"voxels of {' x '.join(f'{v:.3g}' for v in spacing)} mm, {coarse[axis]:.1f}x as coarse as a "
        f"{settings.size}³ cube's on axis {'xyz'[axis]} (at most {MAX_UPSAMPLING:g}x): resizing it up would train "
        f"blur; {fix}"
    )


def _check_not_labels(data: np.ndarray) -> None:
    """Refuse a label map or a mask (a segmentation beside the scans), which has only a few distinct values: a
    strided sample decides for almost every scan, the whole volume for the rest."""
    if len(np.unique(data.ravel()[:: max(1, data.size // 100_000)])) > LABEL_VALUES:
        return
    values = np.unique(data)
    if len(values) <= LABEL_VALUES:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise InputError(
            f"only {len(values)} distinct values ({shown}): a label map or a mask, not an intensity image; give the "
            f"scan (a --layout or --modality that leaves out segmentations)"
        )


NEGATIVE_FRACTION = 0.01  # more negative voxels than this: intensities not of a brain-masked scan (background 0)


def check_intensities(data: np.ndarray) -> None:
    """Refuse intensity conventions that the normalisation would get wrong: a volume already in [-1, 1] with a
    negative background (prepared or generated), or z-scored or shifted intensities (clipping their negative
    half at 0 would lose half the brain)."""
    negative = np.count_nonzero(data < 0) / data.size
    if negative <= NEGATIVE_FRACTION:
        return
    low, high = float(data.min()), float(data.max())
    if low >= -1.001 and high <= 1.001:
        raise InputError(
            f"already in [-1, 1] with {negative:.0%} of its voxels negative: a prepared or generated volume, not a "
            f"scan; give the original images"
        )
    raise InputError(
        f"{negative:.0%} of its voxels are negative (down to {low:.3g}): z-scored or shifted intensities; give the "
        f"images before intensity normalisation"
    )


DARK_EDGE = 0.1  # the image's edge brighter than this fraction of the brain's bright end: no dark background


def check_background(data: np.ndarray, percentile: float) -> None:
    """Refuse a scan whose background is not dark (the normalisation maps 0 to the background's -1): an inverted
    image, or one whose background was never removed, would put a bright frame into the training set."""
    edge = float(np.median(np.concatenate([data[face].ravel() for face in _faces(data.ndim)])))
    every_other = data[::2, ::2, ::2]  # an eighth of the voxels estimate the bright end well enough here
    top = float(np.percentile(every_other[every_other > 0], percentile))
    if edge > DARK_EDGE * top:
        raise InputError(
            f"its background is not dark: the image's edge is at {edge / top:.0%} of the brain's bright end (an "
            f"inverted image, or a background that was not removed); give a scan with a zero background"
        )


def _foreground_extent_mm(data: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    box = bounding_box(data)
    return np.array([(b.stop - b.start) * s for b, s in zip(box, spacing)])


GENERATED_BACKGROUND = -0.98  # a generated voxel this close to the -1 of the background is background


def preprocess(
    path: str | Path, settings: Settings = Settings(), channel: int = -1, generated: bool = False
) -> tuple[np.ndarray, dict]:
    """One file to one normalised `size`^3 cube, with what the manifest records about it. `generated`: a model's
    [-1, 1] volume (`--allow-generated`), read back as intensities over a zero background."""
    data, spacing = load_ras(path, channel)
    if generated:
        data = np.where(data > GENERATED_BACKGROUND, (data + 1) / 2, 0).astype(np.float32)
    data = nan_background(data)
    check_volume(data, spacing)
    check_resolution(data, spacing, settings)
    _check_not_labels(data)
    check_intensities(data)
    np.maximum(data, 0.0, out=data)  # a few slightly negative voxels: noise beside a zero background
    check_background(data, settings.percentile)
    cube, fov_mm = to_cube(data, spacing, settings.size, settings.stretch)
    info = {
        "shape": "x".join(map(str, data.shape)),
        "spacing": "x".join(f"{s:.4g}" for s in spacing),
        "fov_mm": round(fov_mm, 3),
    }
    volume = normalise(cube, settings.percentile)
    if volume.min() > -1.0:  # what every volume of a cache holds (`cache.load_cache`): one would refuse them all
        raise InputError(
            f"no voxel of zero background (the darkest is at {(volume.min() + 1) / 2:.0%} of the brain's bright end); "
            f"give a scan with a zero background"
        )
    return volume, info


def _work(args: tuple[Entry, Settings, bool]) -> tuple[Entry, np.ndarray | None, str]:
    entry, settings, allow_generated = args
    descrip = _descrip(Path(entry.source))
    generated = generated_reason(entry.source, descrip)
    if generated and not allow_generated:
        return entry, None, f"{generated}; a model's output is not training data (--allow-generated to use it)"
    try:
        volume, info = preprocess(entry.source, settings, entry.channel, generated=generated is not None)
    except InputError as exc:
        return entry, None, str(exc)
    except OSError as exc:
        return entry, None, f"cannot be read ({exc.strerror or exc})"
    entry.shape, entry.spacing, entry.fov_mm = info["shape"], info["spacing"], info["fov_mm"]
    entry.origin = origin_of(descrip)
    return entry, volume, ""


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class PrepareResult:
    out: Path
    written: int
    reused: int
    rejected: list[tuple[str, str]]


def _read_previous(out: Path, settings: Settings) -> dict[tuple[str, int], tuple[np.ndarray, dict]]:
    """Volumes and manifest rows of an earlier run with the same settings, keyed by (checksum, channel): the same
    bytes make the same volume, whatever path spells them."""
    try:
        previous = json.loads((out / "settings.json").read_text())
        if previous != asdict(settings):
            return {}
        volumes = np.load(out / "volumes.npy", mmap_mode="r")
        rows = read_manifest(out)
        if len(rows) != len(volumes):
            return {}
        return {(r["sha256"], int(r["channel"])): (volumes[i], r) for i, r in enumerate(rows)}
    except (OSError, ValueError):  # damaged: every volume is made again
        return {}


def _check_out(src: str, out: Path, settings: Settings, overwrite: bool) -> None:
    """`prepare` writes only where the rule of every command lets it (`folders.check_claim`: a cache of its own
    counts as its own, and one of other settings is replaced only with `overwrite`), and never over its inputs."""
    root = Path(re.split(r"[*?\[]", src)[0]) if _is_pattern(src) else Path(src)
    root, target = root.resolve(), out.resolve()
    if target == root or target in root.parents:
        raise ValueError(f"{out}: the inputs ({src}) lie inside this folder; choose an --out outside them")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    foreign = sorted(names - CACHE_FILES - {LOCK})
    if "volumes.npy" in names and foreign:  # a cache is replaced whole: what else lies in it would go with it
        raise FolderRefused(
            f"{out}: a cache that also holds {shown_names(foreign)}, which `alphagan prepare` did not write; move "
            f"them out of it, or choose another --out"
        )
    record_of = partial(_cache_record, settings=settings)
    check_claim(out, "prepare", asdict(settings), overwrite=overwrite, record_of=record_of)


def _cache_record(out: Path, settings: Settings) -> dict | None:
    """A cache's ownership record, as `folders.owner_record` gives a claimed folder's: a folder holding nothing
    but cache files is `prepare`'s, with the settings its settings.json holds (a damaged one, which a complete run
    replaces, as if this call's); None for any other folder."""
    names = {p.name for p in out.iterdir()}
    if not names or not names <= CACHE_FILES:
        return None
    asked = asdict(settings)
    try:
        saved = json.loads((out / "settings.json").read_text())
        earlier = {k: saved.get(k) for k in asked}  # the rest (percentile, version) is the code's, not the user's
    except (OSError, ValueError, AttributeError):
        earlier = asked
    return {"command": "prepare", "settings": earlier, "writes": sorted(CACHE_FILES)}


@contextlib.contextmanager
def _locked(out: Path):
    """One `prepare` at a time per cache; temporary folders left by a killed run are cleaned or restored."""
    check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    busy = f"{out}: another prepare is writing this cache; wait for it to finish"
    lock = take_lock(out.with_name(f".{out.name}.lock"), busy, RuntimeError)
    try:
        recover_folder(out, locked=True)
        yield
    finally:
        lock.release()


def prepare(
    src: str,
    out: str | Path,
    size: int = 64,
    layout: str = "auto",
    modality: str | None = None,
    stretch: bool = False,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_generated: bool = False,
) -> PrepareResult:
    """Preprocess every input of `src` into the cache folder `out`; see the module docstring. `overwrite` replaces
    a cache prepared with other settings; `allow_generated` takes volumes a model generated (refused otherwise).
    An `out` that is a symbolic link is followed: the cache is written where it points, and the link is kept."""
    try:
        check("size", size)  # what `train` trains: one definition of a size for every command
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    settings = Settings(size=size, stretch=stretch)
    out = followed(Path(out))
    _check_out(src, out, settings, overwrite)
    files = files_of(src)
    entries = find_inputs(src, layout, modality, files)
    if not entries:
        raise FileNotFoundError(f"{src}: no input images found: {why_no_inputs(src, layout, modality)}")
    if unread := unread_files(files):  # beside the images it reads: said, not silently left out
        formats = ", ".join(sorted({f for _, f in unread}))
        warnings.warn(
            f"{src}: left out {len(unread)} file(s) in formats prepare does not read ({formats}; e.g. "
            f"{unread[0][0]}); convert them to NIfTI (.nii.gz) to include them",
            stacklevel=2,
        )
    if broken := broken_links(files):
        warnings.warn(
            f"{src}: left out {len(broken)} link(s) to files that are not there (e.g. {broken[0]} -> "
            f"{os.readlink(broken[0])}); mount or restore their targets to include them",
            stacklevel=2,
        )
    with _locked(out):
        return _prepare_locked(entries, src, out, settings, workers, progress, allow_generated, overwrite)


def _once(entries: list[Entry], progress: bool) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Each subject once: a file reached by two paths, or a byte-identical copy under another name, is reported
    as a duplicate of the first and left out. Also computes each entry's SHA-256 (the manifest's)."""
    kept, rejected = [], []
    first: dict[tuple[str, int], str] = {}
    # Shown once it takes a second: a few large files take as long as many small ones.
    for entry in tqdm(entries, desc="checksums", unit="file", disable=not progress, delay=1.0, leave=False):
        try:
            entry.source.encode("utf-8")
        except UnicodeEncodeError:
            name = entry.source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            rejected.append((name, "its name is not valid UTF-8; rename the file"))
            continue
        try:
            entry.sha256 = sha256(entry.source)
        except OSError:
            entry.sha256 = ""  # unreadable: _work reports why
        same = {"the same file as": (os.path.realpath(entry.source), entry.channel)}
        same["the same bytes as"] = (entry.sha256, entry.channel)
        for what, key in same.items():
            if key[0] and key in first:
                rejected.append((entry.source, f"{what} {first[key]}: one subject counted once"))
                break
        else:
            first.update(dict.fromkeys(same.values(), entry.source))
            kept.append(entry)
    return kept, rejected


def _dropped(out: Path, entries: list[Entry]) -> list[str]:
    """The sources of the cache in `out` that none of `entries` has, neither their bytes (checksummed, whatever
    path spells them) nor their file (changed since): what replacing the cache with `entries` would lose."""
    try:
        rows = read_manifest(out)
    except (OSError, ValueError):
        return []
    inputs = {(entry.sha256, entry.channel) for entry in entries}
    inputs |= {(os.path.realpath(entry.source), entry.channel) for entry in entries}
    lost = []
    for row in rows:
        channel = int(row["channel"])
        if not {(row.get("sha256"), channel), (os.path.realpath(row["source"]), channel)} & inputs:
            lost.append(row["source"])
    return lost


def _prepare_locked(
    entries: list[Entry],
    src: str,
    out: Path,
    settings: Settings,
    workers: int | None,
    progress: bool,
    allow_generated: bool = False,
    overwrite: bool = False,
) -> PrepareResult:
    entries, duplicates = _once(entries, progress)
    lost = [] if overwrite else _dropped(out, entries)
    if lost:  # the cache would lose subjects: another --src, or files removed from it
        raise FolderRefused(
            f"{out}: holds {len(lost)} subject(s) that --src {src} does not have ({shown_names(lost)}); add "
            f"--overwrite to replace the cache with the inputs of --src alone, or choose another --out"
        )
    previous = _read_previous(out, settings)
    todo, reused = [], []
    for index, entry in enumerate(entries):
        (reused if (entry.sha256, entry.channel) in previous else todo).append((index, entry))

    with atomic_folder(out) as tmp:
        # Volumes are written as they arrive, into a scratch array in input order; never all held in memory.
        scratch = reserved_array(tmp / "scratch.npy", (len(entries),) + (settings.size,) * 3)
        ok = [False] * len(entries)
        rejected: list[tuple[str, str]] = list(duplicates)
        for index, entry in reused:
            volume, row = previous[(entry.sha256, entry.channel)]
            entry.shape, entry.spacing, entry.fov_mm = row["shape"], row["spacing"], float(row["fov_mm"])
            entry.origin = row.get("origin") or ""  # caches written before origins were recorded have none
            scratch[index], ok[index] = volume, True
        workers = min(workers or os.cpu_count() or 1, len(todo)) or 1  # no more processes than volumes
        jobs = [(entry, settings, allow_generated) for _, entry in todo]
        with (
            worker_pool(workers) as pool,
            tqdm(total=len(todo), desc="prepare", unit="vol", disable=not progress) as bar,
        ):
            results = pool.map(_work, jobs, chunksize=1) if pool else map(_work, jobs)
            for (index, _), (entry, volume, reason) in zip(todo, results):
                entries[index] = entry  # the worker's copy carries shape, spacing and cube size
                if volume is None:
                    rejected.append((entry.source, reason))
                else:
                    scratch[index], ok[index] = volume, True
                bar.update()
        rejected += _same_images(scratch, ok, entries)
        for source, reason in rejected:
            print(f"rejected {source}: {reason}", file=sys.stderr)
        good = [i for i, flag in enumerate(ok) if flag]
        if not good:
            raise RuntimeError(f"{src}: none of the {len(entries)} inputs could be used; see the reasons above")
        _write_cache_files(tmp, settings, scratch, good, [entries[i] for i in good], rejected)
        del scratch
        (tmp / "scratch.npy").unlink()
    return PrepareResult(out, len(good) - len(reused), len(reused), rejected)


def _signature(volume: np.ndarray) -> np.ndarray:
    """The means of a volume's 8 x 8 x 8 blocks: two volumes within `SAME_IMAGE` everywhere have signatures within
    it too, so a pair whose signatures differ more is not compared voxel by voxel."""
    size = volume.shape[0]
    return volume.reshape(8, size // 8, 8, size // 8, 8, size // 8).mean(axis=(1, 3, 5), dtype=np.float64)


class SameImages:
    """An index of prepared volumes (`volumes`, an array or memory map of them, by row) that finds the one an image
    is (`find`): within `SAME_IMAGE` at every voxel, as the same scan saved again is (as .nii and .nii.gz, with
    another header text, scaled, or as integers); two scans of one subject, even minutes apart, differ far more.
    Only volumes whose means and block means (`_signature`) are that close are compared voxel by voxel."""

    def __init__(self, volumes: np.ndarray):
        self.volumes = volumes
        self.means: list[float] = []  # of the volumes added, sorted, with their rows and signatures
        self.rows: list[int] = []
        self.signatures: list[np.ndarray] = []

    def add(self, row: int) -> None:
        self._insert(row, _signature(np.asarray(self.volumes[row])))

    def find(self, volume: np.ndarray) -> tuple[int, float] | None:
        """The earliest row added that is the same image as `volume`, and their largest voxel difference."""
        volume = np.asarray(volume)
        return self._match(volume, _signature(volume))

    def find_or_add(self, row: int) -> tuple[int, float] | None:
        """`find` for the volume of `row`, which is added where it is no image added before."""
        volume = np.asarray(self.volumes[row])
        signature = _signature(volume)
        found = self._match(volume, signature)
        if found is None:
            self._insert(row, signature)
        return found

    def _insert(self, row: int, signature: np.ndarray) -> None:
        at = bisect.bisect(self.means, float(signature.mean()))
        self.means.insert(at, float(signature.mean()))
        self.rows.insert(at, row)
        self.signatures.insert(at, signature)

    def _match(self, volume: np.ndarray, signature: np.ndarray) -> tuple[int, float] | None:
        mean = float(signature.mean())  # the volume's: its blocks are of one size
        low = bisect.bisect_left(self.means, mean - SAME_IMAGE)
        high = bisect.bisect_right(self.means, mean + SAME_IMAGE)
        near = [
            self.rows[low + i]
            for i, s in enumerate(self.signatures[low:high])
            if np.abs(s - signature).max() < SAME_IMAGE
        ]
        for row in sorted(near):
            gap = float(np.abs(volume - self.volumes[row]).max())
            if gap < SAME_IMAGE:
                return row, gap
        return None


def same_image_text(gap: float) -> str:
    """How close two volumes that are one image are."""
    return "identical voxels" if gap == 0 else f"its voxels within {gap:.1g} of it"


def _same_images(volumes: np.ndarray, ok: list[bool], entries: list[Entry]) -> list[tuple[str, str]]:
    """Each image once, whatever its file: a prepared volume that is the same image as an earlier one (`SameImages`)
    is left out (`ok` cleared), with the reason; the earliest file is the one kept."""
    index, rejected = SameImages(volumes), []
    for row, entry in enumerate(entries):
        if not ok[row]:
            continue
        found = index.find_or_add(row)
        if found is None:
            continue
        other, gap = found
        ok[row] = False
        reason = f"the same image as {entries[other].source} ({same_image_text(gap)}): one subject counted once"
        rejected.append((entry.source, reason))
    return rejected


def _write_cache_files(
    folder: Path,
    settings: Settings,
    scratch: np.ndarray,
    rows: list[int],
    entries: list[Entry],
    rejected: list[tuple[str, str]],
) -> None:
    volumes = reserved_array(folder / "volumes.npy", (len(rows),) + (settings.size,) * 3)
    for i, row in enumerate(rows):
        volumes[i] = scratch[row]
    volumes.flush()
    del volumes
    write_cache_tables(folder, asdict(settings), entries, rejected)
