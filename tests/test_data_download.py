"""data/download.py without network: pinned files served by a local HTTP server on 127.0.0.1.

The download tests hide the repository's copies of LoFiT's splits (data/splits/) so that those files
take the download path; the tests at the end check the repository's copies themselves.
"""
import dataclasses
import functools
import http.server
import io
import socket
import threading
import zipfile

import pytest

import data.download
from conftest import SPLITS_DIR, shared_path
from data import DataError, load_examples
from data.download import cache_dir, resolve, sha256_of
from data.files import FILES
from data.readers import load_records


class Server:
    """Serves a dict {url path: bytes} and counts requests per path."""

    def __init__(self):
        self.files, self.hits = {}, {}
        handler = functools.partial(_Handler, self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path, payload):
        self.files[path] = payload
        return self.url + path


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, server, *args, **kwargs):
        self.owner = server
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.owner.hits[self.path] = self.owner.hits.get(self.path, 0) + 1
        payload = self.owner.files.get(self.path)
        if payload is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOFIT_DATA_DIR", raising=False)
    monkeypatch.setattr(data.download, "BUNDLED_DIR", tmp_path / "no_bundled_copies")


def closed_port_url(path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def point_at(monkeypatch, relpath, *urls):
    monkeypatch.setitem(FILES, relpath, dataclasses.replace(FILES[relpath], urls=tuple(urls)))


def test_download_verifies_caches_and_never_downloads_again(server, monkeypatch):
    datasets = SPLITS_DIR
    for split in ("train", "val", "test"):
        relpath = f"mquake/{split}.jsonl"
        point_at(monkeypatch, relpath, server.serve(f"/{split}.jsonl", (datasets / relpath).read_bytes()))
    assert len(load_examples("mquake", "val")) == 95
    assert (cache_dir() / "mquake" / "val.jsonl").read_bytes() == (datasets / "mquake" / "val.jsonl").read_bytes()
    assert server.hits == {"/val.jsonl": 1}
    load_examples("mquake", "val")
    resolve("mquake/val.jsonl")
    assert server.hits == {"/val.jsonl": 1}


def test_sha256_mismatch_is_an_error_and_leaves_nothing_behind(server, monkeypatch):
    good = (SPLITS_DIR / "clutrr" / "val.json").read_bytes()
    point_at(monkeypatch, "clutrr/val.json", server.serve("/val.json", good[:-100]))
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        resolve("clutrr/val.json")
    assert "clutrr/val.json" in str(err.value)
    assert not (cache_dir() / "clutrr").exists() or not any((cache_dir() / "clutrr").iterdir())


def test_mirrors_are_tried_in_order(server, monkeypatch):
    good = (SPLITS_DIR / "clutrr" / "val.json").read_bytes()
    point_at(monkeypatch, "clutrr/val.json", closed_port_url("/val.json"), server.url + "/missing",
             server.serve("/val.json", good))
    assert resolve("clutrr/val.json").read_bytes() == good


def test_offline_message_names_the_file_and_how_to_supply_it(monkeypatch):
    point_at(monkeypatch, "clutrr/test.json", closed_port_url("/test.json"))
    with pytest.raises(DataError) as err:
        load_examples("clutrr", "test")
    message = str(err.value)
    assert "could not download clutrr/test.json" in message
    assert "--data-dir" in message and "LOFIT_DATA_DIR" in message and str(cache_dir()) in message


def test_corrupt_cached_file_is_reported_not_used(server, monkeypatch):
    path = cache_dir() / "clutrr" / "val.json"
    path.parent.mkdir(parents=True)
    path.write_text("[]")
    point_at(monkeypatch, "clutrr/val.json", server.serve("/val.json", b"unused"))
    with pytest.raises(DataError, match="Delete"):
        resolve("clutrr/val.json")
    assert server.hits == {}


def test_zip_archive_is_fetched_once_for_all_its_members(server, monkeypatch):
    raw = shared_path("datasets", "siqa", "raw")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, member in [("train.jsonl", "train.jsonl"), ("train-labels.txt", "train-labels.lst"),
                             ("dev.jsonl", "dev.jsonl"), ("dev-labels.txt", "dev-labels.lst")]:
            archive.writestr("socialiqa-train-dev/" + member, (raw / name).read_bytes())
    url = server.serve("/socialiqa-train-dev.zip", buffer.getvalue())
    for name in ("train.jsonl", "train-labels.txt", "dev.jsonl", "dev-labels.txt"):
        point_at(monkeypatch, f"siqa/raw/{name}", url)
    assert resolve("siqa/raw/train.jsonl").read_bytes() == (raw / "train.jsonl").read_bytes()
    assert resolve("siqa/raw/train-labels.txt").read_bytes() == (raw / "train-labels.txt").read_bytes()
    assert resolve("siqa/raw/dev-labels.txt").read_bytes() == (raw / "dev-labels.txt").read_bytes()
    assert server.hits == {"/socialiqa-train-dev.zip": 1}


def test_broken_zip_is_an_error(server, monkeypatch):
    point_at(monkeypatch, "siqa/raw/dev.jsonl", server.serve("/x.zip", b"not a zip"))
    with pytest.raises(DataError, match="not a valid zip"):
        resolve("siqa/raw/dev.jsonl")


def test_damaged_zip_member_falls_through_to_the_next_mirror(server, monkeypatch):
    member = shared_path("datasets", "siqa", "raw", "dev-labels.txt").read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("socialiqa-train-dev/dev-labels.lst", member)
    good = buffer.getvalue()
    data_start = 30 + len("socialiqa-train-dev/dev-labels.lst")  # after the local file header
    damaged = bytearray(good)
    damaged[data_start + 10] ^= 0xFF
    bad_url = server.serve("/bad.zip", bytes(damaged))
    point_at(monkeypatch, "siqa/raw/dev-labels.txt", bad_url)  # the only mirror: one clear error
    with pytest.raises(DataError, match="member socialiqa-train-dev/dev-labels.lst is damaged"):
        resolve("siqa/raw/dev-labels.txt")
    point_at(monkeypatch, "siqa/raw/dev-labels.txt", bad_url, server.serve("/good.zip", good))
    assert resolve("siqa/raw/dev-labels.txt").read_bytes() == member


def test_environment_variable_selects_a_local_copy(server, monkeypatch):
    monkeypatch.setenv("LOFIT_DATA_DIR", str(SPLITS_DIR))
    point_at(monkeypatch, "mquake/val.jsonl", server.serve("/val.jsonl", b"unused"))
    assert len(load_examples("mquake", "val")) == 95
    assert server.hits == {} and not cache_dir().exists()


def test_every_pinned_url_is_a_full_commit_or_official_archive():
    for relpath, spec in FILES.items():
        assert len(spec.sha256) == 64, relpath
        for url in spec.urls:
            assert url.startswith("https://"), url
            if "raw.githubusercontent.com" in url:
                commit = url.split("/")[5]
                assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), url


def test_pins_match_the_official_files_in_shared():
    datasets = shared_path("datasets")
    for relpath, spec in FILES.items():
        assert len(load_records(relpath, datasets)) == spec.records, relpath  # verifies sha256 too


# ---------------------------------------------------------------- the repository's copies (data/splits/)

BUNDLED = [relpath for relpath, spec in FILES.items() if spec.bundled]


def use_bundled(monkeypatch, directory=SPLITS_DIR):
    monkeypatch.setattr(data.download, "BUNDLED_DIR", directory)


def test_lofit_splits_are_in_the_repository_and_nothing_else_is():
    assert sorted(BUNDLED) == sorted(p for p in FILES if p.split("/")[0] in ("truthfulqa", "mquake", "clutrr"))
    assert len(BUNDLED) == 12
    for relpath in BUNDLED:
        assert sha256_of(SPLITS_DIR / relpath) == FILES[relpath].sha256, relpath
        assert len(load_records(relpath, SPLITS_DIR)) == FILES[relpath].records, relpath
    for task in ("truthfulqa", "mquake", "clutrr"):
        assert (SPLITS_DIR / task / "LICENSE").is_file(), task
    held = sorted(str(p.relative_to(SPLITS_DIR)) for p in SPLITS_DIR.rglob("*") if p.is_file() and p.name != "LICENSE")
    assert held == sorted(BUNDLED + ["LICENSE-lofit", "README.md"])


def test_repository_copies_are_byte_identical_to_shared():
    datasets = shared_path("datasets")
    for relpath in BUNDLED:
        assert (SPLITS_DIR / relpath).read_bytes() == (datasets / relpath).read_bytes(), relpath


def test_lofit_splits_are_read_from_the_repository_without_network(server, monkeypatch):
    use_bundled(monkeypatch)
    for relpath in BUNDLED:
        point_at(monkeypatch, relpath, server.serve("/" + relpath, b"unused"))
    assert resolve("clutrr/train.json") == SPLITS_DIR / "clutrr" / "train.json"
    assert [len(load_examples("truthfulqa", s, fold=f)) for f in (0, 1) for s in ("train", "val", "test")] == \
        [326, 82, 409, 327, 82, 408]
    assert len(load_examples("mquake", "test")) == 864 and len(load_examples("clutrr", "train")) == 300
    assert server.hits == {} and not cache_dir().exists()


def test_a_modified_repository_copy_is_refused_not_used(server, monkeypatch, tmp_path):
    copies = tmp_path / "splits"
    (copies / "mquake").mkdir(parents=True)
    (copies / "mquake" / "val.jsonl").write_bytes((SPLITS_DIR / "mquake" / "val.jsonl").read_bytes()[:-50])
    use_bundled(monkeypatch, copies)
    good = (SPLITS_DIR / "mquake" / "val.jsonl").read_bytes()
    point_at(monkeypatch, "mquake/val.jsonl", server.serve("/val.jsonl", good))
    with pytest.raises(DataError, match=r"expected 3cbf9245.*git checkout") as err:
        load_examples("mquake", "val")
    assert str(copies / "mquake" / "val.jsonl") in str(err.value)
    assert server.hits == {}  # refused, not silently replaced by a download


def test_data_dir_takes_precedence_over_the_repository_copy(monkeypatch, tmp_path):
    use_bundled(monkeypatch)
    local = tmp_path / "local"
    (local / "clutrr").mkdir(parents=True)
    (local / "clutrr" / "val.json").write_text("[]")
    with pytest.raises(DataError, match="sha256"):  # the local copy is the one read (and checked)
        load_examples("clutrr", "val", data_dir=local)
    with pytest.raises(DataError, match=r"clutrr/test.json not found.*repository's copy"):
        load_examples("clutrr", "test", data_dir=local)
