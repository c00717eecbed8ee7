"""Every data file the tasks read: where it comes from (pinned), its sha256, its record count.

Paths are relative to a data directory laid out like ../shared/datasets; the copies in the
repository (data/splits/) and the download cache use the same layout, so either can itself be
passed as --data-dir.

Sources, all pinned to a full commit hash (or an immutable official archive) and checked by sha256:
- LoFiT's own splits (TruthfulQA, MQuAKE, CLUTRR): GitHub fc2869/lo-fit, folder dataset/. These
  files are also in the repository, byte for byte (data/splits/, with their licences), and are
  read from there; their URLs are kept as provenance and as the fallback where that copy is absent.
- SIQA / ARC-Challenge / BoolQ in the LLM-Adapters instruction format: GitHub
  AGI-Edgerunners/LLM-Adapters, folder dataset/.
- SIQA's raw training set (LLM-Adapters has no SIQA train file of its own): the official AI2
  archive socialiqa-train-dev.zip, with a pinned GitHub copy of the same archive as a mirror.
(The Hub copies of SIQA / ARC / BoolQ are parquet files, which this project does not read.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "splits"
"""The repository's copies of LoFiT's splits (data/splits/), laid out like a --data-dir."""

LOFIT = ("https://raw.githubusercontent.com/fc2869/lo-fit/"
         "ebd344a273d3dab0b63d8bbfd7ecdb5185ae5b7b/dataset/")
LLM_ADAPTERS = ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/"
                "816657208af4db747803f87ba40a4c71383fed7a/dataset/")
SIQA_ZIPS = (
    "https://storage.googleapis.com/ai2-mosaic/public/socialiqa/socialiqa-train-dev.zip",
    "https://raw.githubusercontent.com/kashrest/socialiqa-nlp244/"
    "1aafec2a59ba137b6f4a4ab6b3534dec0170662f/socialiqa-train-dev.zip",
)


@dataclass(frozen=True)
class DataFile:
    """One pinned file.

    Attributes:
        sha256: Hex digest of the exact bytes.
        records: Number of records (CSV rows, JSON list items, JSONL lines, label lines).
        urls: Where to download it, tried in order (mirrors of the same bytes).
        zip_member: If set, each url is a zip archive and the file is this member of it.
        bundled: The file is in the repository, under BUNDLED_DIR.
    """
    sha256: str
    records: int
    urls: tuple[str, ...]
    zip_member: str | None = None
    bundled: bool = False


def _lofit(path: str, sha256: str, records: int) -> DataFile:
    return DataFile(sha256, records, (LOFIT + path,), bundled=True)


def _llm_adapters(path: str, sha256: str, records: int) -> DataFile:
    return DataFile(sha256, records, (LLM_ADAPTERS + path,))


def _siqa(member: str, sha256: str, records: int) -> DataFile:
    return DataFile(sha256, records, SIQA_ZIPS, zip_member="socialiqa-train-dev/" + member)


FILES: dict[str, DataFile] = {
    "truthfulqa/fold_0_train_seed_42.csv": _lofit(
        "truthfulqa/fold_0_train_seed_42.csv",
        "e80aebee6876ceec76ac030bcfd31c070b9c23809077500a3b183640386fb136", 326),
    "truthfulqa/fold_0_val_seed_42.csv": _lofit(
        "truthfulqa/fold_0_val_seed_42.csv",
        "5563034f53a463202f4c2ac82336a58d81d0ec02460f7d80e8abce6a4972161a", 82),
    "truthfulqa/fold_0_test_seed_42.csv": _lofit(
        "truthfulqa/fold_0_test_seed_42.csv",
        "4bd4d0db03751e652c6811b053e14c2f4ea43da888571fa0f15df42e7544a67c", 409),
    "truthfulqa/fold_1_train_seed_42.csv": _lofit(
        "truthfulqa/fold_1_train_seed_42.csv",
        "0342def493a6afdaae11737cd557393c0cde2cc35d26d58e7a2fd4c954997fba", 327),
    "truthfulqa/fold_1_val_seed_42.csv": _lofit(
        "truthfulqa/fold_1_val_seed_42.csv",
        "375030fc5bfe7315825f0272b95f6d2b0b0f6332f7121ba57537ec5c1fc1969e", 82),
    "truthfulqa/fold_1_test_seed_42.csv": _lofit(
        "truthfulqa/fold_1_test_seed_42.csv",
        "e9019df6fca8a1e25eed3e2256196d30a2675528e76eae0b812b5092fa114455", 408),
    "mquake/train.jsonl": _lofit(
        "MQuAKE/train.jsonl", "5db931bd09457245d1a133fe8df86a45985d28767ba6f032d1b7dcc737e22498", 134),
    "mquake/val.jsonl": _lofit(
        "MQuAKE/val.jsonl", "3cbf9245ba671458d0979c5bba569e838d54fce860e8d0c5af0bc2ce54d41e83", 95),
    "mquake/test.jsonl": _lofit(
        "MQuAKE/test.jsonl", "3090ef350f4322878968466881de9ec988b5b71daf55d5d9b04fb894a5ebac87", 864),
    "clutrr/train.json": _lofit(
        "clutrr/train.json", "8640526e573444bdf52bd78eee0bf3a9f2e96bb3bb6d7610021dc05751a5c873", 3151),
    "clutrr/val.json": _lofit(
        "clutrr/val.json", "afcae888ed7862081496151a33b9bed157d709b01589c2db566266ecdd906f1e", 450),
    "clutrr/test.json": _lofit(
        "clutrr/test.json", "cf400381f8a12a703265f95df1387c217a71525325f725ff2b8dc08123c30056", 450),
    "siqa/raw/train.jsonl": _siqa(
        "train.jsonl", "4c5333dea02be6d212114a83f17f7bbcbdb53b3d692f476bd40dcd242b6233de", 33410),
    "siqa/raw/train-labels.txt": _siqa(
        "train-labels.lst", "37cd494b60750f4f7a8c7cdd15fad545f4159070dbeb0431597e06e996ae2fd6", 33410),
    "siqa/raw/dev.jsonl": _siqa(
        "dev.jsonl", "d8128dfe60783a9971b954ca82dd57b87b05d5d40468876d51a8e1ad2c557465", 1954),
    "siqa/raw/dev-labels.txt": _siqa(
        "dev-labels.lst", "2d882ff71969d3980d37dd07aecdf9093c6e63e27c670f3a203bcf3b9b74bc05", 1954),
    "siqa/llm_adapters/test.json": _llm_adapters(
        "social_i_qa/test.json", "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d", 1954),
    "arc_challenge/llm_adapters/train.json": _llm_adapters(
        "ARC-Challenge/train.json", "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb", 1119),
    "arc_challenge/llm_adapters/test.json": _llm_adapters(
        "ARC-Challenge/test.json", "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7", 1172),
    "boolq/llm_adapters/train.json": _llm_adapters(
        "boolq/train.json", "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83", 9427),
    "boolq/llm_adapters/test.json": _llm_adapters(
        "boolq/test.json", "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9", 3270),
}
