"""atomic.py: outputs appear whole or not at all, with ordinary permissions."""
import os
import stat

import pytest

from storage.atomic import ordinary_mode, write_atomically, write_json_atomically


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomically(tmp_path / "sub" / "a.json", {"x": "é"})
        assert mode(tmp_path / "sub" / "a.json") == 0o644 == ordinary_mode()
        assert (tmp_path / "sub" / "a.json").read_text(encoding="utf-8") == '{\n "x": "é"\n}\n'
    finally:
        os.umask(old)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"new but incomplete")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, half_then_crash)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_adapter_and_export_are_readable_by_others(tmp_path):
    from adapter import export_merged, save_adapter
    from hf_reference import make_checkpoint
    from model import Llama
    old = os.umask(0o022)
    try:
        path, _ = make_checkpoint(tmp_path / "ckpt", "llama2")
        model = Llama.from_pretrained(path)
        save_adapter(tmp_path / "a.safetensors", model, [(0, 1)], stage=2, task="mquake")
        out = export_merged(model, tmp_path / "merged")
        assert mode(tmp_path / "a.safetensors") == 0o644
        assert mode(out) == 0o755 and all(mode(f) == 0o644 for f in out.iterdir())
    finally:
        os.umask(old)
