"""Turn a data file's relative path into a verified file on disk.

Where a file comes from, in order:
1. A local copy: `data_dir` (the --data-dir flag) or else the LOFIT_DATA_DIR environment variable,
   a directory laid out like ../shared/datasets. Nothing is downloaded then.
2. The repository's own copy, for LoFiT's splits of TruthfulQA, MQuAKE and CLUTRR (data/splits/).
3. The cache: $LOFIT_CACHE/datasets, default ~/.cache/lofit/datasets (same layout).
4. A download from the pinned sources in data/files.py into the cache (SIQA / ARC / BoolQ, or a
   LoFiT split whose repository copy is absent, e.g. from a checkout without data/splits/).

Every file is checked against its pinned sha256 wherever it comes from; a file that does not match
is never used, and downloads are written atomically (temporary file, then rename), so the cache
never holds a partial file. A verified cached file is never downloaded again.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from storage.atomic import write_bytes_atomically

from .common import DataError
from .files import BUNDLED_DIR, FILES, DataFile

DATA_DIR_ENV = "LOFIT_DATA_DIR"
CACHE_ENV = "LOFIT_CACHE"
TIMEOUT_S = 60


def cache_dir() -> Path:
    """Directory that holds downloaded data files ($LOFIT_CACHE/datasets or ~/.cache/lofit/datasets)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lofit"
    return Path(root).expanduser() / "datasets"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return a verified local path for the data file `relpath` (a key of data.files.FILES).

    Args:
        relpath: Path relative to a data directory, e.g. "clutrr/train.json".
        data_dir: Local directory laid out like ../shared/datasets; None means $LOFIT_DATA_DIR,
            or, when that is unset too, the repository's copy (data/splits/) of a LoFiT split,
            else the cache (downloading into it if needed).

    Raises:
        DataError: the file is missing from `data_dir`, fails its sha256 check, or cannot be
            downloaded; the message names the file and how to supply it.
    """
    spec = FILES[relpath]
    local = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if local:
        path = Path(local).expanduser() / relpath
        if not path.is_file():
            raise DataError(f"{path} not found. The data directory {local} (from --data-dir or "
                            f"{DATA_DIR_ENV}) must be laid out like ../shared/datasets and hold {relpath}; "
                            f"or leave both unset to read the repository's copy (LoFiT's splits) or download the "
                            f"official file")
        _check(path, spec, f"Re-copy {relpath} from the official source (see data/files.py)")
        return path
    path = BUNDLED_DIR / relpath
    if spec.bundled and path.is_file():
        _check(path, spec, f"Restore the repository's copy (git checkout -- {path})")
        return path
    path = cache_dir() / relpath
    if path.is_file():
        _check(path, spec, f"Delete {path} to download it again")
        return path
    _download(relpath, spec)
    return path


def _check(path: Path, spec: DataFile, remedy: str) -> None:
    got = sha256_of(path)
    if got != spec.sha256:
        raise DataError(f"{path} has sha256 {got}, expected {spec.sha256}: the file is truncated, "
                        f"modified or not the official one. {remedy}")


def _download(relpath: str, spec: DataFile) -> None:
    """Fetch `relpath` from its first working source and store it (and zip siblings) in the cache."""
    failures = []
    for url in spec.urls:
        try:
            payload = _fetch(url)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            failures.append(f"{url}: {getattr(err, 'reason', err)}")
            continue
        if spec.zip_member is None:
            problem = _store(relpath, spec, payload)
        else:
            problem = _store_zip_members(relpath, url, payload)
        if problem is None:
            return
        failures.append(f"{url}: {problem}")
    tried = "\n  ".join(failures)
    raise DataError(f"could not download {relpath}:\n  {tried}\n"
                    f"Without network access, copy the official file to {cache_dir() / relpath}, or pass "
                    f"--data-dir DIR (or set {DATA_DIR_ENV}=DIR) where DIR is laid out like ../shared/datasets")


def _fetch(url: str) -> bytes:
    print(f"downloading {url}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": "lofit-data"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read()


def _store(relpath: str, spec: DataFile, payload: bytes) -> str | None:
    """Write verified bytes to the cache atomically; return a problem description instead on mismatch."""
    got = hashlib.sha256(payload).hexdigest()
    if got != spec.sha256:
        return f"sha256 mismatch (got {got}, expected {spec.sha256}); nothing was written"
    write_bytes_atomically(cache_dir() / relpath, payload)
    return None


def _store_zip_members(relpath: str, url: str, payload: bytes) -> str | None:
    """Store every pinned member of the archive at `url` (so the archive is fetched only once)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile:
        return "not a valid zip archive"
    siblings = {rel: spec for rel, spec in FILES.items() if url in spec.urls and spec.zip_member}
    problem = None
    for rel, spec in siblings.items():
        if (cache_dir() / rel).is_file():
            continue
        try:
            member = archive.read(spec.zip_member)
        except KeyError:
            member_problem = f"the archive has no member {spec.zip_member}"
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            member_problem = f"the archive's member {spec.zip_member} is damaged ({e})"
        else:
            member_problem = _store(rel, spec, member)
        if rel == relpath:
            problem = member_problem
    return problem
