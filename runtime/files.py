"""File helpers: JSON with clear errors, and writes that never leave a half-written artifact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from runtime.errors import LladaVError


def read_json(path, what: str) -> dict:
    """A JSON object from `path`; a missing or malformed file is a LladaVError naming it."""
    path = Path(path)
    if not path.is_file():
        raise LladaVError(f"{what}: {str(path)!r} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LladaVError(f"{what}: {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LladaVError(f"{what}: {str(path)!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def write_json(path, data) -> None:
    """Write JSON through a temporary name, renamed into place when complete."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path, text: str) -> None:
    """Write text through a temporary name, renamed into place when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_output_dir(path, flag: str) -> Path:
    """Before any work, for a command that writes the directory `path` (the user's `flag` in errors):
    a file there is refused, and so is a place it cannot write (the directory is replaced through a
    sibling, so its parent, or the nearest existing ancestor, must be writable, and the directory
    itself if it exists). What a directory holds besides the command's own files is the command's
    to keep (atomic_directory's `keep`), never to delete (docs/bundle.md, "Existing outputs")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LladaVError(f"{flag} {str(path)!r}: is a file; expected a directory to write into (or a new path)")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LladaVError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file; expected a directory above the output")
    for place in (ancestor, *([path] if path.is_dir() else [])):
        if not os.access(place, os.W_OK | os.X_OK):
            raise LladaVError(f"{flag} {str(path)!r}: {str(place)!r} is not writable; expected a place this user can write")
    return path


@contextlib.contextmanager
def output_lock(path, flag: str):
    """Hold an exclusive lock on writing `path` (a lock file beside it, `.NAME.lock`, locked with flock:
    released whenever this process ends, however it ends; removed when done). A second writer of the
    same output is refused with the first one's pid, instead of both reporting success and the last
    rename winning."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LladaVError(f"{flag} {str(path)!r}: another process (pid {holder}) is writing it now; expected one "
                              "writer at a time (wait for it, or use another output)") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiting writer then retries on a fresh file
        os.close(fd)


def keep_everything(rel) -> bool:
    """atomic_directory's `keep` for commands that own only the files they write: keep all others."""
    return True


@contextlib.contextmanager
def atomic_directory(final, keep=lambda rel: False):
    """Yield a temporary sibling directory; on success it replaces `final`, on error it is removed.

    Files of the old `final` that the new one does not have are carried over (hard links) when
    `keep(relative path)` says so. A reader never sees a partly written `final`: the old one is
    renamed aside, the new one renamed into place, then the old one removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if final.exists():
            carry_over(final, tmp, keep)
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def carry_over(old: Path, new: Path, keep) -> list[Path]:
    """Hard-link (or copy) into `new` every file of `old` that `new` lacks and `keep` accepts."""
    carried = []
    for path in sorted(p for p in old.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(old)
        if (new / rel).exists() or not keep(rel):
            continue
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, new / rel)
        except OSError:
            shutil.copy2(path, new / rel)
        carried.append(rel)
    return carried


def check_writable(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise LladaVError(f"{flag} {str(path)!r}: is a directory; expected a file path to write")
    if not parent.is_dir():
        raise LladaVError(f"{flag} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LladaVError(f"{flag} {str(path)!r}: not writable")
