"""Writing outputs so that nobody ever reads half of one.

Every file is written to a temporary name in the destination's directory, then renamed into
place (os.replace is atomic within one filesystem): a reader sees the old file or the new one,
and a crash leaves no partial output. Finished files get the ordinary permissions (0666 or 0777
minus the umask), not the owner-only mode of temporary files.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plainly created file (or directory) would get under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(tmp) to fill a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the bytes reach the disk before the name points at them
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, obj) -> None:
    """JSON, indented one space per level, UTF-8 kept as is."""
    write_text_atomically(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
