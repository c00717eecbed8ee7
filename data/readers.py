"""Parse data files into plain Python records, turning every defect into one clear DataError.

Each reader checks the record count against the pinned count in data/files.py, so a file cut at a
record boundary is reported instead of silently yielding fewer examples.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from .common import DataError
from .download import resolve
from .files import FILES


def load_records(relpath: str, data_dir: str | os.PathLike | None = None) -> list:
    """Resolve, verify and parse the data file `relpath`; return its records.

    The format follows the extension: .json (a list), .jsonl (one object per line),
    .csv (rows as dicts of strings), .txt (one stripped line per record).
    """
    path = resolve(relpath, data_dir)
    readers = {".json": read_json_list, ".jsonl": read_jsonl, ".csv": read_csv, ".txt": read_lines}
    records = readers[path.suffix](path)
    expected = FILES[relpath].records
    if len(records) != expected:
        raise DataError(f"{path} holds {len(records)} records, expected {expected}: the file is truncated "
                        f"or not the official one; replace it with the official file")
    return records


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); the file is corrupt: replace it") from None


def read_json_list(path: Path) -> list:
    """A JSON file holding a list of records."""
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt: "
                        f"replace it") from None
    if not isinstance(data, list):
        raise DataError(f"{path} should hold a JSON list of records, found {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list:
    """A JSON-lines file: one JSON object per non-empty line (lines end at "\\n" only, as readlines)."""
    records = []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number} is not valid JSON ({err}); the file is truncated "
                            f"or corrupt: replace it") from None
    return records


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file with a header row; every row must have exactly the header's columns."""
    with open(path, newline="", encoding="utf-8") as f:
        try:
            rows = list(csv.DictReader(f, strict=True))
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not valid CSV ({err}); the file is truncated or corrupt: "
                            f"replace it") from None
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise DataError(f"{path}, line {number}: the row does not have the header's columns; "
                            f"the file is truncated or corrupt: replace it")
    return rows


def read_lines(path: Path) -> list[str]:
    """A text file with one record per line (trailing empty lines ignored)."""
    return [line.strip() for line in _text(path).rstrip("\n").split("\n")]


def field(record: Any, key: str, where: str, kind: type = str) -> Any:
    """record[key], checked to exist and to be of type `kind`; `where` names the record in errors."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing field {key!r}; the file is not in the expected format")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} should be {kind.__name__}, found {type(value).__name__}")
    return value
