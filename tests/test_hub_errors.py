"""hub.resolve_model_dir: every way a name can fail ends in one HubError line, never a traceback.

There is no network in the tests: huggingface_hub.snapshot_download is replaced by fakes that raise the
exceptions the real one raises (built with huggingface_hub's own hf_raise_for_status from an HTTP
response, as the real client does) or that "download" a fake repo listing through the same
allow/ignore pattern filter the real one applies.
"""
import errno

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status, validate_repo_id

from storage import hub

# huggingface_hub >= 1.0 raises its HTTP errors from httpx2 responses (it depends on httpx2).
httpx2 = pytest.importorskip("httpx2", reason="needs the huggingface_hub >= 1.0 HTTP client (httpx2)")

REPO = "some-org/some-model"


def http_error(status: int, message: str, url: str = f"https://huggingface.co/{REPO}/resolve/main/config.json",
               code: str | None = None):
    """The exception huggingface_hub raises for an HTTP response with this status, server message and error code."""
    headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    response = httpx2.Response(status, headers=headers, json={"error": message},
                               request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as error:
        return error
    raise AssertionError(f"status {status} did not raise")


def fake_download(raises):
    """A snapshot_download that checks the repo id as the real one does, then raises `raises`."""
    def snapshot_download(repo_id, **kwargs):
        validate_repo_id(repo_id)
        raise raises
    return snapshot_download


def fake_repo(files: list[str], root):
    """A snapshot_download that writes the files of a fake repo the patterns allow and returns the folder."""
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        validate_repo_id(repo_id)
        calls.append(dict(allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        folder = root / "snapshot"
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
        folder.mkdir(exist_ok=True)
        return str(folder)
    snapshot_download.calls = calls
    return snapshot_download


def resolve_error(name, **kwargs) -> str:
    with pytest.raises(hub.HubError) as caught:
        hub.resolve_model_dir(name, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, "messages are one line"
    return message


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


# ---------------------------------------------------------------- names that are neither directory nor repo id

@pytest.mark.parametrize("name", ["foo/bar baz", "a/b/c", "my model", "org/name.git", "org--x/y"])
def test_invalid_repo_id_is_a_missing_directory(monkeypatch, name):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(LocalEntryNotFoundError("offline")))
    message = resolve_error(name)
    assert f"no such directory {name}, and {name} is not a Hugging Face repo id either" in message


@pytest.mark.parametrize("name", ["./missing", "../missing/model", "/no/such/dir", "~/no-such-dir-xyz"])
def test_path_like_name_is_a_missing_directory(monkeypatch, name):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(AssertionError("hub was asked")))
    assert resolve_error(name).startswith(f"no such directory {name};")


def test_mistyped_path_under_an_existing_folder_says_no_such_directory(monkeypatch, tmp_path):
    (tmp_path / "weights" / "stories260K_hf").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    offline = LocalEntryNotFoundError("Got: ConnectError: [Errno 101] Network is unreachable\nPlease check")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(offline))
    message = resolve_error("weights/stories260K_hff")
    assert message.startswith("no such directory weights/stories260K_hff") and "could not download" not in message
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_download(http_error(404, "Repository not found", "https://huggingface.co/api/models/"
                                                 "weights/stories260K_hff/revision/main", code="RepoNotFound")))
    message = resolve_error("weights/stories260K_hff")
    assert message.startswith("no such directory weights/stories260K_hff") and "no repo of that name" in message


def test_missing_repo(monkeypatch):
    missing = http_error(404, "Repository not found", f"https://huggingface.co/api/models/{REPO}/revision/main",
                         code="RepoNotFound")
    assert type(missing).__name__ == "RepositoryNotFoundError"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(missing))
    message = resolve_error(REPO)
    assert f"{REPO} is neither a local directory nor a repo on the Hugging Face Hub" in message
    assert "HF_TOKEN" in message


def test_existing_directory_never_touches_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(AssertionError("hub was asked")))
    assert hub.resolve_model_dir(str(tmp_path)) == tmp_path


# ---------------------------------------------------------------- download failures

def test_refused_token(monkeypatch):
    refused = http_error(401, "Invalid credentials in Authorization header")
    assert type(refused).__name__ == "HfHubHTTPError" and refused.response.status_code == 401
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(refused))
    message = resolve_error(REPO, token="hf_expired")
    assert "refused" in message and "HF_TOKEN" in message and "login" in message and REPO in message


def test_disabled_repo(monkeypatch):
    disabled = http_error(403, "Access to this resource is disabled.")
    assert type(disabled).__name__ == "DisabledRepoError"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(disabled))
    message = resolve_error(REPO)
    assert "disabled" in message and REPO in message


def test_server_error_names_the_status(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(http_error(503, "Service Unavailable")))
    message = resolve_error(REPO)
    assert "HTTP 503 (Service Unavailable)" in message and REPO in message


@pytest.mark.parametrize("error", [
    httpx2.ProxyError("407 Proxy Authentication Required"),
    httpx2.ReadTimeout("The read operation timed out"),
    httpx2.ConnectError("[Errno 111] Connection refused"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    RuntimeError("something unforeseen"),
], ids=lambda e: type(e).__name__)
def test_network_and_unforeseen_errors_name_repo_and_cause(monkeypatch, error):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(error))
    message = resolve_error(REPO)
    assert REPO in message and type(error).__name__ in message and str(error).split()[-1] in message


def test_disk_full(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_download(OSError(errno.ENOSPC, "No space left on device")))
    message = resolve_error(REPO)
    assert "No space left on device" in message and "HF_HOME" in message


def test_ctrl_c_is_not_swallowed(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        hub.resolve_model_dir(REPO)


def test_unreachable_hub_keeps_the_cause(monkeypatch):
    cause = "Got: HfHubHTTPError: 504 Gateway Timeout\nAn error happened while trying to locate the files"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(LocalEntryNotFoundError(cause)))
    message = resolve_error(REPO)
    assert "could not reach the Hugging Face Hub (offline, or the Hub failed)" in message
    assert "504 Gateway Timeout" in message and "no network" not in message


# ---------------------------------------------------------------- which files are fetched

MISTRAL_LIKE = ["config.json", "generation_config.json", "consolidated.safetensors", "params.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                "model.safetensors.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "adapter_model.safetensors", "README.md",
                "original/consolidated.00.pth", "onnx/model.safetensors", "model-x/model.safetensors"]


def test_only_the_files_the_loader_reads_are_downloaded(monkeypatch, tmp_path):
    fake = fake_repo(MISTRAL_LIKE, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = hub.resolve_model_dir(REPO)
    fetched = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert fetched == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                              "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                              "special_tokens_map.json"])


def test_single_file_weights_are_downloaded(tmp_path):
    chosen = filter_repo_objects(["model.safetensors", "pytorch_model.bin", "consolidated.safetensors"],
                                 allow_patterns=hub.MODEL_FILES, ignore_patterns=hub.IGNORED_FILES)
    assert list(chosen) == ["model.safetensors"]


def test_repo_with_only_pickled_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_repo(["config.json", "pytorch_model.bin", "tokenizer.model"], tmp_path))
    message = resolve_error(REPO)
    assert "ships no safetensors weights" in message and "save_pretrained" in message and REPO in message


def test_tokenizer_only_repo_needs_no_weights(monkeypatch, tmp_path):
    fake = fake_repo(["tokenizer.model", "tokenizer_config.json", "model.safetensors"], tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = hub.resolve_model_dir(REPO, need_weights=False)
    assert (folder / "tokenizer.model").is_file() and not (folder / "model.safetensors").exists()
