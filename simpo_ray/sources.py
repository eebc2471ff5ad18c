"""Where preference rows come from: files, globs, folders, save_to_disk folders, the Hub.

A *source* is one string: a local file (``.jsonl``/``.json``/``.parquet``/``.csv``), a
folder written by ``datasets.Dataset.save_to_disk``, or ``hf://owner/name[@split]`` (a
Hugging Face hub dataset; a bare ``owner/name`` that is not a local path means the
same). ``expand_files`` turns the config's paths, globs and folders into a sorted list
of sources; ``iter_file_rows`` yields ``(row_number, row)`` from one of them, row
numbers 1-based (the line for JSONL, the spreadsheet row for CSV, the element of a
``.json`` file holding one array), so every error can name its row. A row that cannot
even be parsed comes back as a ``RowError``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from typing import Iterator

READERS = (".jsonl", ".json", ".parquet", ".csv")
HUB_PREFIX = "hf://"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


class RowError(ValueError):
    """A row that cannot become a training pair. ``str(e)`` is the detailed message
    (it names the field); ``e.reason`` is the short category that counts are kept by."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class DataError(ValueError):
    """Bad input found before training; the message names files, rows and reasons."""


# ---------------------------------------------------------------- sources
def is_saved_dataset(path: str) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return os.path.isfile(os.path.join(path, "state.json")) and \
        os.path.isfile(os.path.join(path, "dataset_info.json"))


def _saved_dict_splits(path: str) -> list[str] | None:
    p = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return list(json.load(f).get("splits", []))


def parse_hub(source: str) -> tuple[str, str]:
    """``hf://owner/name@split`` -> (``owner/name``, split; ``train`` by default)."""
    name = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    name, _, split = name.partition("@")
    return name, split or "train"


def expand_files(spec) -> list[str]:
    """Paths, globs, folders or hub names -> a sorted list of sources (see module doc)."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    out: list[str] = []
    for item in items:
        item = str(item)
        if item.startswith(HUB_PREFIX):
            out.append(item)
            continue
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            matches = [_folder_source(item)] if _is_dataset_folder(item) else _files_under(item)
        elif os.path.isfile(item):
            matches = [item]  # a real file wins over glob syntax in its name (prefs[1].jsonl)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            matches = [_folder_source(m) if os.path.isdir(m) else m for m in matches
                       if os.path.isfile(m) or _is_dataset_folder(m)]
        elif not os.path.exists(item) and _HUB_NAME.match(item) and not item.endswith(READERS):
            out.append(HUB_PREFIX + item)  # not on disk and shaped like owner/name
            continue
        else:
            matches = [item]
        if not matches:
            raise DataError(f"{item}: no data files found")
        for m in matches:
            if os.path.isdir(m):
                out.append(m)
                continue
            if not os.path.isfile(m):
                raise DataError(f"{m}: file not found")
            if not m.endswith(READERS):
                raise DataError(f"{m}: unsupported file type (use {', '.join(READERS)}, "
                                "a save_to_disk folder, or hf://owner/name)")
            out.append(m)
    seen, unique, twice = set(), [], []  # a source listed twice (a glob and its file) is read once
    for src in out:
        key = src if src.startswith(HUB_PREFIX) else os.path.realpath(src)
        (twice if key in seen else unique).append(src)
        seen.add(key)
    if twice:
        print(f"[simpo-ray] WARNING: data files listed more than once are read once: {', '.join(twice)}", flush=True)
    return unique


def _is_dataset_folder(path: str) -> bool:
    return is_saved_dataset(path) or _saved_dict_splits(path) is not None


def _folder_source(path: str) -> str:
    path = path.rstrip("/")
    splits = _saved_dict_splits(path)
    if splits is not None:
        raise DataError(f"{path}: a DatasetDict written by save_to_disk; name one split folder: "
                        + ", ".join(os.path.join(path, s) for s in splits))
    return path


def _files_under(folder: str) -> list[str]:
    """Data files under a plain folder, and save_to_disk folders inside it, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if root != folder and _is_dataset_folder(root):
            out.append(_folder_source(root))  # a DatasetDict root raises: name a split
            dirs.clear()
            continue
        out += [os.path.join(root, f) for f in files if f.endswith(READERS)]
    return sorted(out)


# ---------------------------------------------------------------- rows
def iter_file_rows(path: str) -> Iterator[tuple[int, object]]:
    """Yield (row_number, row_dict_or_RowError), row numbers 1-based (JSONL: the line).

    A file that cannot be parsed at all (not Parquet, a broken JSON array, bytes that
    are not UTF-8 in a CSV, a damaged save_to_disk folder) raises ``DataError`` naming
    the file, the last row read and the parser's reason."""
    n = 0
    try:
        for n, row in _rows(path):
            yield n, row
    except DataError:
        raise
    except Exception as e:  # pyarrow, csv, json, OS errors: whatever the parser says, with the file
        where = f" after row {n}" if n else ""
        raise DataError(f"{path}: cannot be read{where} ({type(e).__name__}: {e})") from None


def _rows(path: str) -> Iterator[tuple[int, object]]:
    if path.startswith(HUB_PREFIX):
        yield from _hub_rows(path)
        return
    if os.path.isdir(path):
        yield from _saved_dataset_rows(path)
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if path.endswith(".csv"):
        # A field longer than csv's default 128 KiB limit is an enormous row, not a broken
        # file: read it, and let truncation to max_length deal with it as for JSONL.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
            try:
                for n, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
                    yield n, row
            except UnicodeDecodeError:
                raise DataError(f"{path}: {_first_bad_utf8(path)} (a CSV file is read as UTF-8 text)") from None
        return
    if path.endswith(".json") and _starts_with_bracket(path):  # one JSON array, not JSONL
        yield from _json_array_rows(path)
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, RowError(f"invalid UTF-8 at byte {e.start}", "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RowError(f"invalid JSON: {e.msg} at column {e.colno}", "invalid JSON")
                continue
            except (ValueError, RecursionError) as e:  # a 5000-digit integer, nesting too deep: this row only
                yield n, RowError(f"invalid JSON: {type(e).__name__}: {str(e)[:200]}", "invalid JSON")
                continue
            yield n, row if isinstance(row, dict) else RowError("row is not a JSON object",
                                                                "not a JSON object")


def _first_bad_utf8(path: str) -> str:
    """Where a file stops being UTF-8: its line and byte (text is decoded in chunks, so
    the decoder's own offset is not the file's)."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"invalid UTF-8 at line {line_no}, byte {offset + e.start}"
            offset += len(raw)
    return "invalid UTF-8"


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _json_array_rows(path: str) -> Iterator[tuple[int, object]]:
    """A ``.json`` file holding one array: row n is its n-th element (1-based)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a valid JSON array ({_first_bad_utf8(path)}); "
                        "use JSON Lines for row-level errors") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a valid JSON array ({e}); use JSON Lines for row-level errors") from None
    for n, row in enumerate(rows, start=1):
        yield n, row if isinstance(row, dict) else RowError("row is not a JSON object", "not a JSON object")


def _saved_dataset_rows(path: str) -> Iterator[tuple[int, dict]]:
    """Rows of a save_to_disk folder through ``datasets.load_from_disk`` (memory-mapped;
    save_to_disk writes any selection/shuffle flattened), as plain Python values
    whatever format the dataset was saved with."""
    from datasets import load_from_disk

    ds = load_from_disk(_folder_source(path)).with_format(None)  # a DatasetDict root raises: name a split
    for n, row in enumerate(ds, start=1):
        yield n, row


def _load_hub(source: str):
    from datasets import load_dataset

    name, split = parse_hub(source)
    try:
        return load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name or split: say which source
        raise DataError(f"{source}: could not load the Hugging Face dataset {name!r} "
                        f"split {split!r} ({type(e).__name__}: {e})") from None


def _hub_rows(source: str) -> Iterator[tuple[int, dict]]:
    for n, row in enumerate(_load_hub(source), start=1):
        yield n, row


# ---------------------------------------------------------------- fingerprint
def fingerprint(files: list[str], settings: dict) -> str:
    """sha256 over the source bytes and the tokenization settings (first 16 hex).

    A save_to_disk folder counts as all its files; a hub dataset as its name, split
    and the ``datasets`` fingerprint of what was loaded.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in files:
        h.update(os.path.basename(p.rstrip("/")).encode())
        if p.startswith(HUB_PREFIX):
            h.update(str(getattr(_load_hub(p), "_fingerprint", "")).encode())
            continue
        parts = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs) \
            if os.path.isdir(p) else [p]
        for part in parts:
            h.update(os.path.relpath(part, p).encode() if part != p else b"")
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
