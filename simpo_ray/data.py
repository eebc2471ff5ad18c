"""Preference rows -> validated, chat-templated, tokenized triplets.

Pure functions first (read a file's rows, normalize a row, tokenize a triplet), then
the Ray Data pipeline that runs them in ``map_batches``. A bad row never raises inside
Ray: it becomes a row with an ``error`` reason, and the driver decides (strict: stop
naming file, row and reason; lenient: drop and count per reason). Nothing is lost
without a count.

Triplet contract: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` where the last two
are completion ids only; chosen and rejected share exactly the same prompt tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

READERS = (".jsonl", ".json", ".parquet", ".csv")


class RowError(ValueError):
    """A row that cannot become a training pair; the message is the reason."""


class DataError(ValueError):
    """Bad input found before training; the message names files, rows and reasons."""


# ---------------------------------------------------------------- files and rows
def expand_files(spec) -> list[str]:
    """Paths, globs or folders -> a sorted list of readable data files."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            matches = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                             if p.endswith(READERS))
        else:
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise DataError(f"{item}: no data files found")
        for m in matches:
            if not os.path.isfile(m):
                raise DataError(f"{m}: file not found")
            if not m.endswith(READERS):
                raise DataError(f"{m}: unsupported file type (use {', '.join(READERS)})")
            out.append(m)
    return out


def iter_file_rows(path: str) -> Iterator[tuple[int, object]]:
    """Yield (row_number, row_dict_or_RowError), row numbers 1-based (JSONL: the line)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
                yield n, row
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, RowError(f"invalid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RowError(f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield n, row if isinstance(row, dict) else RowError("row is not a JSON object")


def fingerprint(files: list[str], settings: dict) -> str:
    """sha256 over the source bytes and the tokenization settings (first 16 hex)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in files:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- row shapes
def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty string or list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"'{field}[{i}]' must be a message with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise RowError(f"'{field}[{i}].content' is not text")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def normalize_row(row: dict) -> tuple[list[dict], str, str]:
    """A row in any accepted shape -> (prompt messages, chosen text, rejected text).

    Shapes: plain strings {prompt, chosen, rejected}; chat lists (chosen/rejected as
    message lists, with or without an explicit prompt); UltraFeedback-binarized
    (chosen/rejected as full conversations that share the prompt turns).
    """
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError(f"missing field '{key}'")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    turns = None
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        for name, conv in (("chosen", c), ("rejected", r)):
            if conv[-1]["role"] != "assistant":
                raise RowError(f"last message of '{name}' is not from the assistant")
        if c[:-1] != r[:-1]:
            raise RowError("prompt differs between chosen and rejected conversations")
        turns = c[:-1] or None
        chosen, rejected = c[-1]["content"], r[-1]["content"]
    elif not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RowError("'chosen' and 'rejected' must be text or message lists")
    if turns is None:
        if prompt is None:
            raise RowError("missing field 'prompt'")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError("empty prompt")
            turns = [{"role": "user", "content": prompt}]
        else:
            turns = _messages(prompt, "prompt")
    if not chosen.strip():
        raise RowError("empty chosen")
    if not rejected.strip():
        raise RowError("empty rejected")
    if chosen == rejected:
        raise RowError("chosen == rejected")
    return turns, chosen, rejected


# ---------------------------------------------------------------- tokenization
def render(tokenizer, turns: list[dict], completion: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, completion text incl. end-of-turn)."""
    if tokenizer.chat_template is None:
        prompt = "\n\n".join(m["content"] for m in turns) + "\n\n"
        return (tokenizer.bos_token or "") + prompt, completion + (tokenizer.eos_token or "")
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        turns + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt):
        raise RowError("chat template does not render the conversation as prompt + completion")
    return prompt, full[len(prompt):]


def tokenize_triplet(tokenizer, turns, chosen: str, rejected: str,
                     max_length: int, max_prompt_length: int) -> dict:
    """Tokenize once, truncate, and check the invariants. Returns the triplet dict."""
    p_text, c_text = render(tokenizer, turns, chosen)
    p_text_r, r_text = render(tokenizer, turns, rejected)
    assert p_text == p_text_r, "prompt rendered differently for chosen and rejected"
    # The template writes BOS itself; the tokenizer must not add another.
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, chosen_ids, rejected_ids = enc(p_text), enc(c_text), enc(r_text)
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos == prompt_ids[1]:
        raise RowError("double BOS after chat template")
    if not chosen_ids or not rejected_ids:
        raise RowError("completion tokenizes to nothing")
    truncated = False
    if len(prompt_ids) > max_prompt_length:  # keep the end: the question is there
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)  # >= 1: config guarantees max_prompt_length < max_length
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids, truncated = chosen_ids[:room], rejected_ids[:room], True
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected identical after truncation")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids, "truncated": truncated}


def split_of(turns: list[dict], seed: int, eval_fraction: float) -> str:
    """Seeded split by prompt hash: the same prompt never lands in both splits."""
    key = json.dumps([seed, turns], sort_keys=True).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") / 2**32
    return "eval" if bucket < eval_fraction else "train"


# ---------------------------------------------------------------- Ray Data UDFs
def read_files_batch(batch: dict) -> Iterator[dict]:
    """map_batches UDF: a batch of file paths -> batches of raw rows (as JSON text,
    so heterogeneous shapes never fight over an Arrow schema)."""
    for path in batch["path"]:
        rows = {"source": [], "row": [], "raw": [], "error": []}
        for n, row in iter_file_rows(str(path)):
            rows["source"].append(str(path))
            rows["row"].append(n)
            if isinstance(row, RowError):
                rows["raw"].append("")
                rows["error"].append(str(row))
            else:
                rows["raw"].append(json.dumps(row, default=str))
                rows["error"].append("")
            if len(rows["row"]) >= 1024:
                yield rows
                rows = {"source": [], "row": [], "raw": [], "error": []}
        if rows["row"]:
            yield rows


class Tokenize:
    """map_batches UDF (an actor: the tokenizer loads once). Raw rows -> triplets."""

    def __init__(self, name_or_path: str, tiny_spec: dict, max_length: int,
                 max_prompt_length: int, seed: int, eval_fraction: float):
        from transformers import AutoTokenizer

        from simpo_ray.engine import resolve_model_path

        self.tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, tiny_spec))
        self.args = (max_length, max_prompt_length)
        self.seed, self.eval_fraction = seed, eval_fraction

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("source", "row", "error", "split", "prompt_ids",
                               "chosen_ids", "rejected_ids", "truncated")}
        for source, n, raw, err in zip(batch["source"], batch["row"], batch["raw"], batch["error"]):
            trip, split = None, "train"
            if not err:
                try:
                    turns, chosen, rejected = normalize_row(json.loads(raw))
                    trip = tokenize_triplet(self.tok, turns, chosen, rejected, *self.args)
                    split = split_of(turns, self.seed, self.eval_fraction)
                except RowError as e:
                    err = str(e)
            out["source"].append(source)
            out["row"].append(int(n))
            out["error"].append(err)
            out["split"].append(split)
            for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
                out[k].append(trip[k] if trip else [])
            out["truncated"].append(bool(trip and trip["truncated"]))
        return out


def summarize_errors(errors: list[tuple[str, int, str]], strict: bool, show: int = 5) -> dict:
    """Counts per reason; in strict mode raise DataError listing the first offenders."""
    counts = dict(Counter(reason for _, _, reason in errors))
    if errors and strict:
        lines = [f"{len(errors)} malformed row(s); counts per reason: {counts}"]
        lines += [f"  {src}: row {n}: {reason}" for src, n, reason in sorted(errors)[:show]]
        lines.append("Fix the rows or set data.strict=false to drop and count them.")
        raise DataError("\n".join(lines))
    return counts


def prepare_datasets(cfg, tokenizer_path: str) -> dict:
    """Read, validate, tokenize and split with Ray Data; materialized once.

    Returns {"train": Dataset, "eval": Dataset | None, "stats": dict}.
    """
    import ray.data
    from ray.data.expressions import col

    d = cfg.data
    files = expand_files(d.train_files)
    eval_files = expand_files(d.eval_files) if d.eval_files else []
    fraction = 0.0 if eval_files else d.eval_fraction

    def pipeline(paths, frac):
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        ds = ds.map_batches(read_files_batch, batch_size=1)
        ds = ds.map_batches(Tokenize, batch_size=256, concurrency=1,
                            fn_constructor_kwargs=dict(
                                name_or_path=cfg.model.name_or_path,
                                tiny_spec=dataclasses.asdict(cfg.model.tiny), max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length, seed=d.seed,
                                eval_fraction=frac))
        return ds.materialize()

    tokenized = pipeline(files, fraction)
    parts = [tokenized] + ([pipeline(eval_files, 1.0)] if eval_files else [])
    errors = []
    for part in parts:
        bad = part.filter(expr=col("error") != "").select_columns(["source", "row", "error"])
        errors += [(r["source"], r["row"], r["error"]) for r in bad.take_all()]
    dropped = summarize_errors(errors, strict=d.strict)

    keep = ["prompt_ids", "chosen_ids", "rejected_ids"]
    good = tokenized.filter(expr=col("error") == "")
    train = good.filter(expr=col("split") == "train")
    if eval_files:
        eval_ds = parts[1].filter(expr=col("error") == "")
    else:
        eval_ds = good.filter(expr=col("split") == "eval") if fraction > 0 else None
    if d.shuffle:
        train = train.random_shuffle(seed=d.seed)
    stats_cols = ["truncated"]
    train = train.select_columns(keep + stats_cols).materialize()
    n_train = train.count()
    n_trunc = int(train.sum("truncated") or 0) if n_train else 0
    train = train.select_columns(keep)
    if eval_ds is not None:
        eval_ds = eval_ds.select_columns(keep).materialize()
    n_eval = eval_ds.count() if eval_ds is not None else 0
    if n_train == 0:
        raise DataError(f"no training pairs left from {', '.join(files)}")
    settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                "seed": d.seed, "eval_fraction": fraction, "tokenizer": _tokenizer_hash(tokenizer_path)}
    return {
        "train": train, "eval": eval_ds if n_eval else None,
        "stats": {"train_pairs": n_train, "eval_pairs": n_eval, "dropped": dropped,
                  "truncated_pairs": n_trunc, "files": files + eval_files,
                  "fingerprint": fingerprint(files + eval_files, settings)},
    }


def _tokenizer_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        p = Path(path) / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
