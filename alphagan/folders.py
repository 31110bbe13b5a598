"""What every command does with the folders and files it writes (git's rule: never clobber work that is not yours).

- `claim`: `synth`, `train`, `sample`, `evaluate` and `course` write only into a folder that is absent, empty, or
  marked as their own by `.alphagan.json` (the command, its settings and the names it writes, listed before they
  are written). A second call with the same settings writes the same files again; other settings, another
  command's folder or files no command wrote are refused in one line. `overwrite` deletes only the listed names,
  and never a path that another argument of the same call points into (`keep`). That rule is `refusal`, and
  `prepare` applies it to its caches too (a folder of nothing but cache files is its own).
- The claim holds a lock for as long as the command writes, so a second writer on the folder is refused.
- `atomic`: a file is written under a temporary name and renamed, so a reader never sees half of it; on any
  failure the temporary file is removed, and a full disk becomes one line naming the folder. Temporary files of
  a writer that was killed are removed by the next claim of the folder.
- `atomic_folder`: a whole folder (a `prepare` cache, a synthetic cohort) is built beside its place and swapped in;
  `recover_folder` puts back or cleans what a killed writer left. `take_lock` is the one lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import filelock
import numpy as np

MANIFEST = ".alphagan.json"
LOCK = ".alphagan.lock"
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp")  # what `atomic` names its files: .NAME.PID.tmp...
PARTIAL = ".partial-"  # what a folder being built is named: .NAME.partial-PID (`atomic_folder`, `sample`)


class FolderRefused(FileExistsError):
    """A command's output folder holds what the command may not replace; the message says what and what to do."""


class DiskFull(OSError):
    """No space left while writing; the message names the folder and, where known, the space needed."""


def followed(path: Path) -> Path:
    """Where a symbolic link the user named points (made there if missing), or `path` itself: a link is followed,
    never replaced."""
    return path.resolve() if path.is_symlink() else path


def _existing(folder: Path) -> Path:
    """`folder`, or where it is not made yet its nearest parent that is: the one whose disk it will be on."""
    return next(p for p in (folder, *folder.parents) if p.exists())


def amount(nbytes: float) -> str:
    """Bytes as a message says them: MB below a GiB, else GiB."""
    return f"{nbytes / 2**20:.1f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def disk_full(folder: Path, needed: int | None = None) -> DiskFull:
    """The one-line error for a full disk under `folder`."""
    need = f"; it needs {amount(needed)}" if needed else ""
    free = shutil.disk_usage(_existing(folder)).free
    return DiskFull(f"{folder}: no space left on its disk ({amount(free)} free{need}); free some space and run again")


def check_writable(folder: Path, fix: str = "choose another --out", name: str | None = None) -> None:
    """Refuse, in one line and before any work, an output `folder` (made or not; `name`: what the message calls it)
    where nothing can be written: a system or read-only folder, or a path through a file, with `fix`. A file is made
    in its nearest existing folder and removed: a real write, which a permission check would not be for root."""
    base = _existing(Path(folder))
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise FolderRefused(
            f"{name or folder}: nothing can be written in {base} ({exc.strerror or exc}); {fix}"
        ) from None


def check_space(folder: Path, needed: int, what: str, fix: str) -> None:
    """Refuse, before any of it is written, work whose files (`what`, about `needed` bytes) do not fit on the disk
    of `folder` (made or not), with `fix`."""
    check_writable(folder)
    free = shutil.disk_usage(_existing(folder)).free
    if needed > free:
        raise DiskFull(f"{folder}: {what} need about {amount(needed)}, {amount(free)} are free on its disk; {fix}")


def reserve(file: IO, nbytes: int, folder: Path) -> None:
    """Allocate `nbytes` of `file` on disk now, so that writing through a memory map later cannot fail with SIGBUS
    (what a full disk does to a memory-mapped write) but fails here, in one line."""
    try:
        os.posix_fallocate(file.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(folder, nbytes) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: no reservation
            raise


def reserved_array(path: Path, shape: tuple[int, ...], dtype=np.float32) -> np.memmap:
    """A new .npy file, memory-mapped for writing, its space allocated on disk first (`reserve`)."""
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    try:
        with open(path, "r+b") as f:
            reserve(f, os.path.getsize(path), path.parent)
    except BaseException:
        del array
        path.unlink(missing_ok=True)
        raise
    return array


@contextlib.contextmanager
def atomic_folder(out: Path, replace: bool = True) -> Iterator[Path]:
    """The one atomic folder: a temporary folder beside `out` (`.NAME.partial-PID`) to build in, which replaces
    `out` when the block ends, so a reader sees the old folder or the new one, never a mixture (the old one is
    renamed aside, `.NAME.old-PID`, and put back if the swap fails); on any failure it is removed. With
    `replace=False` a folder that another process completed meanwhile is kept, and this one dropped.
    `recover_folder` cleans what a killed writer left."""
    tmp = out.with_name(f".{out.name}{PARTIAL}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists() and not replace:
            return
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)  # what was renamed aside is put back
                raise
            shutil.rmtree(old)
        else:
            try:
                os.replace(tmp, out)
            except OSError:
                if replace or not out.exists():
                    raise  # else another process completed it between the check and the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_folder(out: Path, prefix: str | None = None, locked: bool = False) -> None:
    """What killed `atomic_folder` writers left beside `out`: a folder renamed aside is put back where `out` is
    missing (the kill fell between the two renames) and deleted otherwise; partial folders are deleted, all of them
    when the caller holds `out`'s lock, else those whose writer no longer runs. `prefix`: the partial folders of
    any name starting so (default: `out`'s own)."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)
    prefix = prefix or f".{out.name}{PARTIAL}"
    for partial in out.parent.glob(f"{prefix}*"):
        pid = _builder(partial)
        if pid is not None and (locked or not _running(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _builder(path: Path) -> int | None:
    """The process that was building the folder `path` (`.NAME.partial-PID`), or None for another name."""
    head, _, pid = path.name.rpartition(PARTIAL)
    return int(pid) if head and pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffixes, so that nibabel or torch see the format) to write to; renamed
    to `path` when the block ends, removed when it fails. A `path` that is a symbolic link is followed: the file it
    points to is written, and the link is kept."""
    path = followed(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes[-2:])}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path.parent) from None
        raise


@contextlib.contextmanager
def staged(folder: Path, names: list[str]) -> Iterator[Path]:
    """A hidden folder inside `folder` (`PARTIAL`) to write the files `names` into (those written), all moved into
    place when the block ends: a command stopped midway leaves no partial set that looks finished, and the next
    claim of the folder removes what it left (`remove_temporaries`)."""
    staging = folder / f".staged{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_temporaries(folder: Path) -> None:
    """Delete what `atomic` left in `folder` (and below), and the folders being built in it (`PARTIAL`), when their
    writer was killed; only call it under the lock."""
    for path in folder.rglob(".*.tmp*"):
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    for path in folder.glob(f".*{PARTIAL}*"):
        if path.is_dir() and _builder(path) is not None:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Owned:
    """A claimed folder: written by `command` with `settings`; holds the lock until `release` (or the `with` ends)."""

    folder: Path
    command: str
    settings: dict[str, Any]
    writes: list[str] = field(default_factory=list)
    lock: filelock.BaseFileLock | None = None
    made: bool | None = None  # the folder was absent (True) or empty (False) before the claim; None: it held files

    def add(self, names: list[str]) -> None:
        """List `names` (entries of the folder) as this command's, before writing them."""
        new = [n for n in names if n not in self.writes]
        if new:
            self.writes += new
            self.save()

    def save(self) -> None:
        """Write the manifest (atomically)."""
        record = {"command": self.command, "settings": self.settings, "writes": self.writes}
        with atomic(self.folder / MANIFEST) as tmp:
            tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Owned:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """Release the lock; a command that failed before writing anything leaves the folder as it found it."""
        if kind is not None and self.made is not None and {p.name for p in self.folder.iterdir()} <= {MANIFEST, LOCK}:
            (self.folder / MANIFEST).unlink(missing_ok=True)
            self.release()
            (self.folder / LOCK).unlink(missing_ok=True)
            if self.made:
                with contextlib.suppress(OSError):  # something came in once the lock was released: it stays
                    self.folder.rmdir()
        self.release()


def owner_record(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder a command claimed, None where there is none; a damaged one is refused."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("writes"), list):
            raise ValueError("no list of files")
    except (ValueError, AttributeError) as exc:
        raise FolderRefused(f"{path}: damaged ({exc}); delete it only if nothing else in the folder matters") from None
    return record


def shown_names(names: list[str]) -> str:
    """A list of names as a message shows it: the first four, and how many more."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def take_lock(path: Path, busy: str, error: type[Exception] = FolderRefused) -> filelock.BaseFileLock:
    """The one lock of the package: an exclusive `filelock` on `path`, taken at once or refused with `error(busy)`
    (another process holds it); held until released, or until the process ends, killed or not."""
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise error(busy) from None
    return lock


def refusal(folder: Path, command: str, record: dict | None, settings: dict, resume: bool, again: bool) -> str | None:
    """The one ownership rule: why `command` may not write into `folder` as it is (None: it may), given the
    folder's ownership `record` (`owner_record`; `prepare` reads its cache's own) and this call's `settings`."""
    if record is None:
        names = (p.name for p in folder.iterdir())
        entries = sorted(n for n in names if n not in (MANIFEST, LOCK) and not _TEMPORARY.match(n))
        if entries:
            return f"holds files that `alphagan {command}` did not write ({shown_names(entries)}); choose another --out"
        return None
    if record["command"] != command:
        return f"holds the output of `alphagan {record['command']}`; choose another --out"
    if resume or not [n for n in record["writes"] if (folder / n).exists()]:
        return None
    if not again:  # a run that continues (`train`)
        return (
            f"holds an earlier `alphagan {command}`; add --resume to continue it, --overwrite to replace it, or "
            f"choose another --out"
        )
    if record["settings"] == settings:
        return None
    changed = sorted(k for k in {*record["settings"], *settings} if record["settings"].get(k) != settings.get(k))
    was = record["settings"]
    held = ", ".join(f"{k} {'not set' if was.get(k) is None else was[k]}" for k in changed)
    what = f"other settings ({held})" if changed else "the same settings"
    return f"holds an earlier `alphagan {command}` with {what}; add --overwrite to replace it, or choose another --out"


def _delete_listed(folder: Path, record: dict, keep: dict[str, Path]) -> None:
    """`overwrite`: the names the manifest lists, unless an argument of this call points into one of them."""
    listed = [folder / n for n in record["writes"] if (folder / n).exists()]
    for argument, path in keep.items():
        hit = next((p for p in listed if path == p.resolve() or p.resolve() in path.parents), None)
        if hit is not None:
            raise FolderRefused(
                f"{folder}: --overwrite would delete {hit.name}, where {argument} points ({path}); copy it elsewhere "
                f"or choose another --out"
            )
    for path in listed:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_claim(
    folder: Path,
    command: str,
    settings: dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    again: bool = True,
    record_of: Callable[[Path], dict | None] = owner_record,
) -> dict | None:
    """What `claim` checks first, without making, locking or changing anything, for a command that would rather
    refuse before long work (the course runner times models first): raises `FolderRefused` where `claim` would
    refuse; returns the folder's ownership record (None for a new or unclaimed folder). `record_of` reads it
    (`prepare`'s caches hold theirs in settings.json)."""
    folder = followed(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderRefused(f"{folder}: exists and is not a folder; choose another --out")
    if not folder.exists():
        return None
    record = record_of(folder)
    reason = refusal(folder, command, record, json.loads(json.dumps(settings)), resume, again)
    if reason is not None and not (overwrite and record is not None and record["command"] == command):
        raise FolderRefused(f"{folder}: {reason}")
    return record


def claim(
    folder: str | Path,
    command: str,
    settings: dict[str, Any],
    writes: list[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    again: bool = True,
    keep: dict[str, str | Path | None] | None = None,
) -> Owned:
    """Make `folder` this command's (see the module docstring) and lock it; `writes` lists the entries it will write.

    `resume` continues what the folder holds; `again=False` refuses even a second call with the same settings
    (`train`: a new run must not mix with the last). `keep`: the paths the call reads, by argument (`{"--init": ...}`),
    which `overwrite` must spare."""
    folder = followed(Path(folder))
    record = check_claim(folder, command, settings, resume=resume, overwrite=overwrite, again=again)
    check_writable(folder)
    fresh = None if folder.exists() and any(folder.iterdir()) else not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails here, before any work
    settings = json.loads(json.dumps(settings))  # as the manifest will hold them
    lock = take_lock(folder / LOCK, f"{folder}: another command is writing here; wait for it to finish")
    try:
        remove_temporaries(folder)
        if overwrite and record is not None and not resume:
            _delete_listed(folder, record, {k: Path(p).resolve() for k, p in (keep or {}).items() if p is not None})
        earlier = [n for n in (record or {}).get("writes", []) if (folder / n).exists()]
        owned = Owned(folder, command, settings, earlier + [n for n in writes if n not in earlier], lock, fresh)
        owned.save()
    except BaseException:
        lock.release()
        raise
    return owned
