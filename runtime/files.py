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


@contextlib.contextmanager
def atomic_directory(final):
    """Yield a temporary sibling directory; on success it replaces `final`, on error it is removed.

    A reader never sees a partly written `final`: it either does not exist or is complete.
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
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
