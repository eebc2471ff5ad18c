"""The Ray Data pipeline: preference files -> validated, tokenized, split datasets.

Reading sources (files, globs, save_to_disk folders, hub names) lives in
``simpo_ray.sources``; the pure row functions (shapes, reasons, render, tokenize,
split) in ``simpo_ray.rows``; this module runs them in ``map_batches``. A bad row
never raises inside Ray: it becomes a row with an ``error`` message and a ``reason``
category, and the driver decides (strict: stop naming file, row and reason; lenient:
drop and count per reason). Nothing is lost without a count.

Train/eval datasets hold ``KEEP``: the triplet plus ``source`` and ``row``, so a batch
can name its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from simpo_ray.rows import (NON_FATAL, NON_JSON_TAG, UNREADABLE, Duplicates, process_row, prompt_group, row_options,
                            split_of, stratified_eval_groups)
from simpo_ray.sources import DataError, RowError, expand_files, fingerprint, iter_file_rows

KEEP = ["prompt_ids", "chosen_ids", "rejected_ids", "source", "row"]


# ---------------------------------------------------------------- Ray Data UDFs
_RAW_COLUMNS = ("source", "row", "raw", "error", "reason")


def read_files_batch(batch: dict) -> Iterator[dict]:
    """map_batches UDF: a batch of source paths -> batches of raw rows (as JSON text,
    so heterogeneous shapes never fight over an Arrow schema)."""
    for path in batch["path"]:
        rows: dict = {k: [] for k in _RAW_COLUMNS}
        last = 0
        try:
            for last, row in iter_file_rows(str(path)):
                rows["source"].append(str(path))
                rows["row"].append(last)
                if isinstance(row, RowError):
                    rows["raw"].append("")
                    rows["error"].append(str(row))
                    rows["reason"].append(row.reason)
                else:
                    rows["raw"].append(json.dumps(row, default=_json_default))
                    rows["error"].append("")
                    rows["reason"].append("")
                if len(rows["row"]) >= 1024:
                    yield rows
                    rows = {k: [] for k in _RAW_COLUMNS}
        except DataError as e:  # the driver raises it (both modes), not a failed Ray task
            for k, v in zip(_RAW_COLUMNS, (str(path), last + 1, "", str(e), UNREADABLE)):
                rows[k].append(v)
        if rows["row"]:
            yield rows


def _json_default(value) -> dict:
    """Values JSON has no type for become a tag naming their type (see rows.NON_JSON_TAG)."""
    return {NON_JSON_TAG: type(value).__name__}


class Tokenize:
    """map_batches UDF (an actor: the tokenizer loads once). Raw rows -> triplets."""

    COLUMNS = ("source", "row", "error", "reason", "split", "group", "prompt_len", "resp_len",
               "prompt_ids", "chosen_ids", "rejected_ids", "truncated", "notes", "pair_key")

    def __init__(self, name_or_path: str, tiny_spec: dict, options: dict, seed: int, eval_fraction: float,
                 eval_sources: tuple = ()):
        """``options``: ``rows.row_options`` of the data config (the model's vocabulary
        size is added here, where the model folder is). Rows of ``eval_sources`` (the
        ``data.eval_files``) are held out whole; the others split by ``eval_fraction``."""
        from transformers import AutoTokenizer

        from simpo_ray.models import resolve_model_path

        path = resolve_model_path(name_or_path, tiny_spec)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.kwargs = dict(options, vocab_size=model_vocab_size(path))
        self.seed, self.eval_fraction, self.eval_sources = seed, eval_fraction, set(eval_sources)

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in self.COLUMNS}
        for source, n, raw, err, reason in zip(batch["source"], batch["row"], batch["raw"],
                                               batch["error"], batch["reason"]):
            trip, split, group = None, "train", ""
            if not err:
                try:
                    turns, trip = process_row(self.tok, json.loads(raw), **self.kwargs)
                    split = "eval" if source in self.eval_sources else split_of(turns, self.seed, self.eval_fraction)
                    group = prompt_group(turns)
                except RowError as e:
                    err, reason = str(e), e.reason
            out["source"].append(source)
            out["row"].append(int(n))
            out["error"].append(err)
            out["reason"].append(reason)
            out["split"].append(split)
            out["group"].append(group)
            for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
                out[k].append(trip[k] if trip else [])
            out["prompt_len"].append(len(trip["prompt_ids"]) if trip else 0)
            out["resp_len"].append(len(trip["chosen_ids"]) + len(trip["rejected_ids"]) if trip else 0)
            out["truncated"].append(bool(trip and trip["truncated"]))
            out["notes"].append(",".join(trip["notes"]) if trip else "")
            out["pair_key"].append(trip["pair_key"] if trip else "")
        return out


def model_vocab_size(path: str) -> int | None:
    """The model's embedding rows (from its config; None when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)
    except Exception:  # no config (tokenizer-only folder): the worker's load will say so
        return None


def _finalize(table, drop: list, eval_groups):
    """map_batches UDF (pyarrow): the well-formed rows, without the repeats named
    ``source\\0row`` in ``drop``; with ``eval_groups`` (a stratified split), split = eval
    for those prompt groups."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table["error"], ""))
    if drop:
        names = pc.binary_join_element_wise(table["source"], pc.cast(table["row"], pa.string()), "\0")
        table = table.filter(pc.invert(pc.is_in(names, value_set=pa.array(drop, type=pa.string()))))
    if eval_groups is not None:
        is_eval = pc.is_in(table["group"], value_set=pa.array(eval_groups, type=pa.string()))
        split = pc.if_else(is_eval, pa.scalar("eval"), pa.scalar("train"))
        table = table.set_column(table.schema.get_field_index("split"), "split", split)
    return table


def summarize_errors(errors: list, strict: bool, show: int = 5) -> dict:
    """Counts per reason; in strict mode raise DataError listing the first offenders.

    ``errors``: (source, row, message[, reason]) tuples; without a reason the message
    is the reason. Non-fatal reasons (pairs identical after truncation) are counted
    but never stop a strict run.
    """
    full = [(e[0], e[1], e[2], e[3] if len(e) > 3 and e[3] else e[2]) for e in errors]
    counts = dict(Counter(reason for *_, reason in full))
    unreadable = sorted(e for e in full if e[3] == UNREADABLE)
    if unreadable:  # a file is not a row: lenient mode does not drop whole files
        raise DataError("\n".join([f"{len(unreadable)} file(s) cannot be read (in strict and lenient mode):"]
                                  + [f"  {msg}" for *_, msg, _ in unreadable]
                                  + ["Fix or remove the file(s)."]))
    fatal = sorted(e for e in full if e[3] not in NON_FATAL)
    if fatal and strict:
        lines = [f"{len(fatal)} malformed row(s); counts per reason: {counts}"]
        lines += [f"  {src}: row {n}: {msg}" for src, n, msg, _ in fatal[:show]]
        lines.append("Fix the rows or set data.strict=false to drop and count them.")
        raise DataError("\n".join(lines))
    return counts


def _with_order(ds):
    """Keep row order through every stage (this dataset and all derived from it
    share its context): sources sorted, rows in file order, whatever task finishes
    first. The seeded shuffle and the split to workers then repeat exactly on a
    rerun or a resume."""
    ds.context.execution_options.preserve_order = True
    return ds


def prepare_datasets(cfg, tokenizer_path: str) -> dict:
    """Read, validate, tokenize and split with Ray Data.

    Returns {"train": Dataset, "eval": Dataset | None, "stats": dict}; the datasets
    hold ``KEEP`` columns, materialized (no lazy stage left, so every epoch streams
    the same blocks in the same order). ``stats["dropped"]`` counts dropped rows per
    reason.

    Start-up matters (every run, sweep trial and CI fit pays it): one execution reads
    and tokenizes every file (train and eval files together), one pass over its small
    columns on the driver decides everything else (refused rows, repeats, the split,
    counts, truncation, notes, mean pair size), and the train and held-out sets are
    each materialized once from it.
    """
    import ray.data
    from ray.data.expressions import col

    d = cfg.data
    files = expand_files(d.train_files)
    eval_files = expand_files(d.eval_files) if d.eval_files else []
    fraction = 0.0 if eval_files else d.eval_fraction
    paths = files + eval_files
    ds = _with_order(ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)))
    ds = ds.map_batches(read_files_batch, batch_size=1)
    ds = ds.map_batches(Tokenize, batch_size=256, concurrency=1, fn_constructor_kwargs=dict(
        name_or_path=cfg.model.name_or_path, tiny_spec=dataclasses.asdict(cfg.model.tiny),
        options=row_options(d), seed=d.seed, eval_fraction=fraction, eval_sources=tuple(eval_files)))
    tokenized = ds.materialize()

    rows = small_columns(tokenized)
    held_out = set(eval_files)
    in_eval_file = [s in held_out for s in rows["source"]]
    bad, repeats = row_outcomes(rows, dedup=[d.dedup and not e for e in in_eval_file])
    dropped = summarize_errors(bad + repeats, strict=d.strict)
    gone = {(src, n) for src, n, *_ in repeats}
    good = [i for i, err in enumerate(rows["error"]) if not err and (rows["source"][i], rows["row"][i]) not in gone]
    split = {i: rows["split"][i] for i in good}
    eval_groups, split_rule = None, "separate files" if eval_files else "seeded hash of the prompt"
    if d.eval_stratify and fraction > 0:
        eval_groups = sorted(stratified_eval_groups([rows["group"][i] for i in good],
                                                    [rows["resp_len"][i] for i in good], fraction, d.seed))
        chosen = set(eval_groups)
        split = {i: "eval" if rows["group"][i] in chosen else "train" for i in good}
        split_rule = "seeded, stratified by response-length quartile"
    train_rows = [i for i in good if split[i] == "train"]
    n_train, n_eval = len(train_rows), len(good) - len(train_rows)
    if n_train == 0:
        raise DataError(f"no training pairs left from {', '.join(files)}")
    n_trunc = sum(bool(rows["truncated"][i]) for i in train_rows)
    notes = Counter(n for i in good if not in_eval_file[i] and rows["notes"][i] for n in rows["notes"][i].split(","))
    mean_pair_tokens = (sum(2 * rows["prompt_len"][i] + rows["resp_len"][i] for i in train_rows) / n_train
                        if d.token_budget else None)
    mean_prompt_tokens = sum(rows["prompt_len"][i] for i in train_rows) / n_train
    # The largest pair as packed, plain and with the prompt once (an "auto" budget fits it).
    max_pair = max((2 * rows["prompt_len"][i] + rows["resp_len"][i], rows["prompt_len"][i] + rows["resp_len"][i] + 1)
                   for i in train_rows)

    final = tokenized.map_batches(_finalize, batch_format="pyarrow", fn_kwargs={
        "drop": [f"{src}\0{n}" for src, n in sorted(gone)], "eval_groups": eval_groups})
    train = final.filter(expr=col("split") == "train").select_columns(KEEP)
    if d.shuffle:  # once, seeded; per-epoch order comes from shuffle_args() in the worker
        train = train.random_shuffle(seed=d.seed)
    train = train.materialize()
    eval_ds = final.filter(expr=col("split") == "eval").select_columns(KEEP).materialize() if n_eval else None
    settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                "seed": d.seed, "eval_fraction": fraction, "tokenizer": _tokenizer_hash(tokenizer_path),
                "column_map": dict(sorted(d.column_map.items())), "eval_stratify": d.eval_stratify,
                "add_bos": d.add_bos, "allow_special_tokens_in_text": d.allow_special_tokens_in_text,
                "dedup": d.dedup, "drop_ties": d.drop_ties}
    return {
        "train": train, "eval": eval_ds,
        "stats": {"train_pairs": n_train, "eval_pairs": n_eval, "dropped": dropped,
                  "dropped_total": sum(dropped.values()), "truncated_pairs": n_trunc, "token_notes": dict(notes),
                  "split": split_rule, "files": paths,
                  **({"mean_pair_tokens": mean_pair_tokens, "mean_prompt_tokens": mean_prompt_tokens,
                      "max_pair_tokens": list(max_pair)} if mean_pair_tokens else {}),
                  "fingerprint": fingerprint(paths, settings)},
    }


SMALL = ("source", "row", "error", "reason", "pair_key", "split", "group", "prompt_len", "resp_len",
         "truncated", "notes")


def small_columns(ds) -> dict:
    """The small columns of a tokenized dataset (``SMALL``, no token ids), as lists in
    row order: one pass."""
    out = {c: [] for c in SMALL}
    for b in ds.select_columns(list(SMALL)).iter_batches(batch_size=8192, batch_format="numpy"):
        for c in SMALL:
            out[c] += b[c].tolist()
    return out


def row_outcomes(rows: dict, dedup: list) -> tuple[list, list]:
    """The small columns (``small_columns``) -> (the refused rows, the repeated pairs),
    each as (source, row, message, reason). A repeat is a well-formed row whose pair
    already came earlier in file order (``rows.Duplicates``); ``dedup``: one flag per
    row (held-out files are not deduplicated)."""
    seen, bad, again = Duplicates(), [], []
    for src, n, err, reason, key, check in zip(rows["source"], rows["row"], rows["error"], rows["reason"],
                                               rows["pair_key"], dedup):
        if err:
            bad.append((str(src), int(n), str(err), str(reason)))
        elif check and (e := seen.check(str(key), str(src), int(n))) is not None:
            again.append((str(src), int(n), str(e), e.reason))
    return bad, again


def _tokenizer_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        p = Path(path) / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- streaming to workers
def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a pure function of (data.seed, epoch)."""
    return int.from_bytes(hashlib.sha256(f"simpo-ray:{seed}:{epoch}".encode()).digest()[:4], "big")


def shuffle_args(data_cfg, epoch: int, batch_size: int) -> dict:
    """``iter_batches`` keyword arguments for one epoch's order.

    Determinism (Ray 2.60): a materialized dataset streams the same blocks in the same
    order every epoch and to every reader (``preserve_order``, ``ingest_config``); the
    local shuffle buffer is a numpy Generator seeded here, so the epoch's sequence of
    batches is a function of (data, seed, epoch) alone: the same on every rank, for
    any number of workers, and again on a resume. The global shuffle happens once, in
    ``prepare_datasets``; the order changes per epoch, mixing over
    ``data.shuffle_buffer_size`` rows, and which rank trains a pair changes with it.
    """
    if not data_cfg.shuffle:
        return {}
    return {"local_shuffle_buffer_size": max(int(data_cfg.shuffle_buffer_size), int(batch_size)),
            "local_shuffle_seed": epoch_seed(data_cfg.seed, epoch)}


def ingest_config():
    """A ``ray.train.DataConfig`` for the trainer's ``dataset_config``. The training set
    is not split: every worker reads the whole stream in the same seeded order and
    trains its share of the micro-batches (``budget.rank_micro``), so the order and the
    data position do not depend on the number of workers (a resume may change it).
    ``preserve_order`` keeps that order across nodes (and makes Ray ignore locality
    hints). Held-out pairs are split (their metrics are sums over ranks)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["eval"], execution_options=opts)
