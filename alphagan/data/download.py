"""Downloading the public cohorts: resumable, checksum-verified, safely extracted.

Used by data_scripts/download.py; notebook 01 shows where real data come from.

IXI (healthy adults, CC BY-SA 3.0) comes as one tar per modality; the Medical Segmentation Decathlon's brain
tumour task (from BraTS, CC BY-SA 4.0) as one tar of 4-D NIfTI files. A download continues where an
interrupted one stopped (HTTP Range), is verified against the archive's published MD5 before anything is
extracted, and no archive member may land outside the target folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from alphagan.progress import tqdm


@dataclass(frozen=True)
class Archive:
    """A dataset's download: where, its published checksum, and what `prepare` finds in it."""

    url: str
    md5: str
    layout: str  # the `prepare --layout` of the extracted files
    subfolder: str  # where the images are after extraction, relative to the target folder


# Checksums as published with these archives (they are also the values MONAI and TorchIO pin).
ARCHIVES = {
    "ixi-t1": Archive(
        "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-T1.tar",
        "34901a0593b41dd19c1a1f746eac2d58",
        "ixi",
        ".",
    ),
    "ixi-t2": Archive(
        "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-T2.tar",
        "e3140d78730ecdd32ba92da48c0a9aaa",
        "ixi",
        ".",
    ),
    "decathlon-brain": Archive(
        "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task01_BrainTumour.tar",
        "240a19d752f0d9e9101544901065d872",
        "decathlon",
        "Task01_BrainTumour",
    ),
}


class DownloadError(RuntimeError):
    """A download or an archive that cannot be trusted, with the reason."""


def md5sum(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch(url: str, dest: str | Path, md5: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, continuing a partial `dest.part` if there is one, then verify its MD5."""
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    by_hand = f"download it yourself (a browser, another --url) to {dest} and run again"
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; {by_hand}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: cannot connect ({exc}); check the connection, or {by_hand}") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0  # the server ignored the Range header: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            interrupted = f"{dest.name}: the download was interrupted; the partial file is kept, run again to resume"
            with (
                open(part, "ab" if resumed else "wb") as f,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                try:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadError(f"{interrupted} ({exc})") from None
            received = part.stat().st_size
            if total is not None and received < total:  # the server closed early: what came is a prefix
                raise DownloadError(f"{interrupted} ({received} of {total} bytes)")
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DownloadError(
                f"{dest.name}: checksum mismatch (MD5 {got}, expected {md5}); the partial file "
                f"was deleted, run the command again to download it afresh"
            )
    os.replace(part, dest)
    return dest


def safe_extract(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a tar into `target`, refusing links and any member whose path would leave `target`."""
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            where = (target / member.name).resolve()
            if where != target and target not in where.parents:
                raise DownloadError(
                    f"{archive}: member {member.name!r} would be written outside {target}; nothing was extracted"
                )
            if not (member.isfile() or member.isdir()):
                raise DownloadError(f"{archive}: member {member.name!r} is a link or device; nothing was extracted")
        # The 'data' filter (Python >= 3.11.4, 3.10.12) enforces the same rules once more inside tarfile.
        tar.extractall(target, members=members, filter="data")
    return [target / m.name for m in members if m.isfile()]


def get_dataset(name: str, root: str | Path, archive: Archive | None = None, progress: bool = True) -> tuple[Path, str]:
    """Download and extract dataset `name` under `root`; returns the image folder and its `prepare` layout.

    `archive` replaces the entry of ARCHIVES (a mirror, or a test server); its checksum applies all the same.
    """
    if archive is None:
        if name not in ARCHIVES:
            raise ValueError(f"unknown dataset {name!r}; known: {sorted(ARCHIVES)}")
        archive = ARCHIVES[name]
    root = Path(root)
    path = fetch(archive.url, root / "archives" / Path(archive.url).name, archive.md5, progress=progress)
    folder = root / name
    done = folder / ".extracted"
    if not done.exists() or done.read_text() != archive.md5:
        safe_extract(path, folder)
        done.write_text(archive.md5)
    return folder / archive.subfolder, archive.layout
