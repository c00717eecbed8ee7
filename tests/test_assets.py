"""The committed test model (tests/assets/stories260K) is the pinned stories260K conversion, byte for byte."""
import hashlib

from conftest import STORIES260K, shared_path

PINNED = {  # the same values as tests/assets/stories260K/README.md and ../shared/weights/README.md
    "config.json": "8dcc4fee32a48ef9a18c1febc932dc044a871901a1549296c661288e35cdf7c5",
    "model.safetensors": "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd",
    "tokenizer.model": "822b28dcdee7b4f2de3332e0066a3f33688e08afb26e9e7808a58aa6426bd55b",
}


def test_stories260k_asset_is_the_pinned_files():
    assert sorted(p.name for p in STORIES260K.iterdir()) == sorted([*PINNED, "LICENSE", "README.md"])
    for name, digest in PINNED.items():
        assert hashlib.sha256((STORIES260K / name).read_bytes()).hexdigest() == digest, name
        assert digest in (STORIES260K / "README.md").read_text(), name


def test_stories260k_asset_equals_the_shared_copy():
    shared = shared_path("weights", "stories260K_hf")
    for name in PINNED:
        assert (STORIES260K / name).read_bytes() == (shared / name).read_bytes(), name
