"""Writing outputs so that nobody ever reads half of one, and a failed write says why in one line.

Every file is written to a temporary name in the destination's directory (`.NAME.xxxxxxxx.tmp`),
then renamed into place (os.replace is atomic within one filesystem): a reader sees the old file
or the new one, and a crash leaves no partial output (a killed process can leave the temporary
file; rundir.py removes those). Finished files get the ordinary permissions (0666 or 0777 minus
the umask), not the owner-only mode of temporary files.

JSON is strict (RFC 8259): NaN and infinity, which json.dumps would write as bare NaN/Infinity
that other readers refuse, are written as null, and a note names the fields.
Any failure to write (read-only filesystem, full disk, a directory where a file should be) is
raised as WriteError, one line naming the path and the reason.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from model import LofitError

TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what mkstemp(prefix=".NAME.", suffix=".tmp") makes

HINTS = {errno.ENOSPC: "the disk is full; free some space", errno.EDQUOT: "the disk quota is exceeded",
         errno.EROFS: "the filesystem is read-only; choose another path", errno.EACCES: "permission denied",
         errno.EPERM: "permission denied", errno.EISDIR: "it is a directory; give a file name",
         errno.ENOTDIR: "a part of the path is a file, not a directory"}


class WriteError(LofitError, OSError):
    """An output could not be written; the message names the path and what to do (errno kept)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def write_error(path, error: BaseException) -> WriteError:
    """A WriteError for `path` from the OSError (or a library's I/O failure) that stopped the write."""
    code = getattr(error, "errno", None)
    if isinstance(error, OSError):
        reason = HINTS.get(code) or error.strerror or str(error)
    elif _nearly_full(Path(path).parent):  # a library's own report of a failed write; its errno is lost
        code, reason = errno.ENOSPC, HINTS[errno.ENOSPC]
    else:
        reason = "the write failed (is the disk full or read-only?)"
    return WriteError(code, f"cannot write {path}: {reason}")


def _nearly_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20  # under 1 MiB left


class LibraryWriteFailure(Exception):
    """A library (torch.save, safetensors) failed while writing a file; it says so in its own words."""


def _is_io_failure(error: BaseException) -> bool:
    """torch.save and safetensors report a failed write as RuntimeError / SafetensorError, not OSError."""
    text = str(error)
    return isinstance(error, (OSError, LibraryWriteFailure)) or any(
        s in text for s in ("file write failed", "failed writing", "IoError", "No space left", "Read-only",
                            "iostream error"))


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plainly created file (or directory) would get under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def reported_write(path: str | os.PathLike):
    """Turn an I/O failure inside the block into a WriteError naming `path`: for writers that do their
    own temporary file and rename (adapter.save_adapter), whose failures must still be one line."""
    try:
        yield
    except Exception as e:
        if _is_io_failure(e) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, replace: bool = True) -> None:
    """Call write(tmp) to fill a temporary file beside `path`, then rename it to `path`.

    With replace=False the file is linked into place only if `path` does not exist yet (a file that
    another process wrote meanwhile is never replaced; WriteError EEXIST says so).

    Raises:
        WriteError: the directory cannot be created or written, the disk is full, `path` is a
            directory, ... (the old file at `path`, if any, is untouched).
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(errno.EISDIR, f"cannot write {path}: it is a directory; give a file name")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the bytes reach the disk before the name points at them
        os.chmod(tmp, ordinary_mode())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails where `path` exists: nobody's file is replaced
            except FileExistsError:
                raise WriteError(errno.EEXIST, f"cannot write {path}: it was created by another process while "
                                               f"this one ran; it was left as it is") from None
            _remove_quietly(Path(tmp))
    except Exception as e:
        if tmp is not None:
            _remove_quietly(Path(tmp))
        if _is_io_failure(e) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise
    except BaseException:  # KeyboardInterrupt: no temporary left behind either
        if tmp is not None:
            _remove_quietly(Path(tmp))
        raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def strict(obj, where: str = "", replaced: list | None = None):
    """`obj` with every non-finite float (NaN, inf) replaced by None; their paths go in `replaced`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if replaced is not None:
            replaced.append(f"{where or '.'} ({obj})")
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj


def json_text(obj, *, name: str = "JSON output", indent: int | None = 1) -> str:
    """Strict JSON text of `obj` (NaN/inf written as null, with a note on stderr naming them)."""
    replaced: list[str] = []
    clean = strict(obj, replaced=replaced)
    if replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        print(f"note: {name}: {len(replaced)} value(s) are not finite numbers and are written as null "
              f"(strict JSON has no NaN or infinity): {shown}", file=sys.stderr)
    return json.dumps(clean, ensure_ascii=False, indent=indent, allow_nan=False)


def write_json_atomically(path: str | os.PathLike, obj, *, replace: bool = True) -> None:
    """Strict JSON, indented one space per level, UTF-8 kept as is; NaN and infinity become null
    (replace=False: refuse to replace a file that exists, see write_atomically)."""
    text = json_text(obj, name=str(path)) + "\n"
    if replace:
        write_text_atomically(path, text)
    else:
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace=False)


def save_torch_atomically(path: str | os.PathLike, obj) -> None:
    """torch.save(obj) to `path`, atomically; a failed write is a WriteError like any other."""
    def write(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # e.g. "basic_ios::clear: iostream error" on a full disk
            raise LibraryWriteFailure(str(e)) from e
    write_atomically(path, write)


def remove_temporaries(directory: str | os.PathLike, name: str | None = None, older_than: float = 0.0) -> list[str]:
    """Delete the `.NAME.xxxxxxxx.tmp` files a killed writer left in `directory`; return their names.

    Args:
        directory: Where to look.
        name: Only the temporaries of this file name (default: of every name).
        older_than: Only those last modified at least this many seconds ago. 0 is for a directory
            that no other process can be writing (rundir.py holds its lock); without a lock, an
            age well above a write's duration leaves a running writer's temporary alone.
    """
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not TEMPORARY.match(entry.name) or (name is not None and not entry.name.startswith(f".{name}.")):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime >= older_than:
                Path(entry.path).unlink()
                removed.append(entry.name)
        except OSError:
            pass
    return sorted(removed)
