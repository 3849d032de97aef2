"""Atomic file writes shared by every stage, the up-front check that an output can be written, JSON configs read with
one-line errors, and a parameter archive read into memory (how a CPU module may take its weights)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PunetError

# How a CPU module's weights reach it at run time: the archive mapped from its file (the page cache's pages,
# nothing read at load), or read once into the process's own memory, which the device then uses in place (no
# copy, the same resident size). Reading costs seconds at load; on a Zen 5 guest the calls ran faster in 8 of 11
# paired processes (median 1.12x), not against the suite's peers (docs/cpu-tuning.md, thirteenth session).
WEIGHTS = ("mapped", "memory")


def check_output(path: str | Path, flag: str = "-o") -> Path:
    """Fail now, in one line, if `path` cannot be written (before any work is done).

    The path must not be a folder, and its nearest existing parent must be a
    writable folder (atomic_path creates the missing ones).
    """
    path = Path(path)
    if path.is_dir():
        raise PunetError(f"{flag} {path}: is a folder; expected a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PunetError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PunetError(f"{flag} {path}: cannot write in {parent} (permission denied or read-only)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    On any exception the temporary file is removed, so a failed stage never
    leaves a half-written artifact under the final name.
    """
    path = Path(path)
    if path.is_dir():
        raise PunetError(f"{path}: is a folder; expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PunetError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask  # mkstemp makes 0600; artifacts get the usual mode
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors) reset it to 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, expected: str, error: type[PunetError] = PunetError) -> dict[str, Any]:
    """A JSON object from `path` (a config file), or `error` in one line naming the file and the fault."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path}: file not found (expected {expected})") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_into_memory(path: Path) -> mmap.mmap:
    """The bytes of `path` in anonymous memory (an mmap object), faulted in as a block first: on the hosts
    measured, touching fresh memory page by page cost more than reading the file."""
    size = path.stat().st_size
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))  # Linux 5.14+; older kernels fault page by page
    except OSError:
        pass
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < size:
                n = f.readinto(view[done:done + (256 << 20)])
                if not n:
                    raise PunetError(f"{path}: ended at byte {done} of {size} while being read")
                done += n
    finally:
        view.release()
    return buf
