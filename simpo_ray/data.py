"""Preference rows -> validated, chat-templated, tokenized triplets.

Pure functions first (normalize a row, tokenize a triplet, split train/eval), then the
Ray Data pipeline that runs them in ``map_batches``. Reading sources (files, globs,
save_to_disk folders, hub names) lives in ``simpo_ray.sources``. A bad row never
raises inside Ray: it becomes a row with an ``error`` message and a ``reason``
category, and the driver decides (strict: stop naming file, row and reason; lenient:
drop and count per reason). Nothing is lost without a count.

Triplet contract: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` where the last two
are completion ids only; chosen and rejected share exactly the same prompt tokens.
Train/eval datasets also carry ``source`` and ``row`` so a batch can name its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from simpo_ray.sources import (READERS, DataError, RowError, expand_files,  # noqa: F401 (re-exported)
                               fingerprint, iter_file_rows)

# Reason categories: counts are kept per category, messages carry the detail.
INVALID_UTF8, INVALID_JSON, NOT_OBJECT = "invalid UTF-8", "invalid JSON", "not a JSON object"
MISSING, WRONG_TYPE, EMPTY = "missing field", "wrong type", "empty text"
SAME, PROMPT_DIFFERS, NON_TEXT = "chosen == rejected", "prompt differs", "non-text content"
BAD_CONVERSATION, TOKENIZATION = "bad conversation", "tokenization"
# A whole file the parser refuses (not a row): stops the run in both modes.
UNREADABLE = "unreadable file"
# Not malformed input but a consequence of max_length: dropped and counted in both modes.
TRUNCATED_SAME = "identical after truncation"
NON_FATAL = frozenset({TRUNCATED_SAME})
REASONS = (INVALID_UTF8, INVALID_JSON, NOT_OBJECT, MISSING, WRONG_TYPE, EMPTY, SAME, PROMPT_DIFFERS,
           NON_TEXT, BAD_CONVERSATION, TOKENIZATION, TRUNCATED_SAME)
FIELDS = ("prompt", "chosen", "rejected")
KEEP = ["prompt_ids", "chosen_ids", "rejected_ids", "source", "row"]


# ---------------------------------------------------------------- row shapes
def _kind(value) -> str:
    """The type of a value as the user wrote it (see ``_json_default`` for the tag)."""
    if isinstance(value, dict) and set(value) == {NON_JSON_TAG}:
        return str(value[NON_JSON_TAG])
    return type(value).__name__


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(f"'{field}' must be a non-empty string or list of messages, got {_kind(value)}",
                       WRONG_TYPE)
    if not value:
        raise RowError(f"'{field}' is an empty list", EMPTY)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"'{field}[{i}]' must be a message with 'role' and 'content'", BAD_CONVERSATION)
        if not isinstance(m["content"], str):
            raise RowError(f"'{field}[{i}].content' is not text", NON_TEXT)
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def normalize_row(row: dict, column_map: dict | None = None) -> tuple[list[dict], str, str]:
    """A row in any accepted shape -> (prompt messages, chosen text, rejected text).

    Shapes: plain strings {prompt, chosen, rejected}; chat lists (chosen/rejected as
    message lists, with or without an explicit prompt); UltraFeedback-binarized
    (chosen/rejected as full conversations that share the prompt turns; its
    score_chosen / score_rejected columns are ignored). ``column_map`` renames:
    {"prompt": "question", ...} reads the prompt from the column ``question``.
    Raises RowError with a message naming the column and a ``reason`` category.
    """
    name = {f: (column_map or {}).get(f, f) for f in FIELDS}
    for key in ("chosen", "rejected"):
        if row.get(name[key]) is None:
            raise RowError(f"missing field '{name[key]}'", MISSING)
    prompt, chosen, rejected = row.get(name["prompt"]), row[name["chosen"]], row[name["rejected"]]
    turns = None
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = _messages(chosen, name["chosen"]), _messages(rejected, name["rejected"])
        for key, conv in (("chosen", c), ("rejected", r)):
            if conv[-1]["role"] != "assistant":
                raise RowError(f"last message of '{name[key]}' is not from the assistant", BAD_CONVERSATION)
        if c[:-1] != r[:-1]:
            raise RowError("prompt differs between chosen and rejected conversations", PROMPT_DIFFERS)
        turns = c[:-1] or None
        chosen, rejected = c[-1]["content"], r[-1]["content"]
    elif not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RowError(f"'{name['chosen']}' and '{name['rejected']}' must be text or message lists, got "
                       f"{_kind(chosen)} and {_kind(rejected)}", WRONG_TYPE)
    if turns is None:
        if prompt is None:
            raise RowError(f"missing field '{name['prompt']}'", MISSING)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError("empty prompt", EMPTY)
            turns = [{"role": "user", "content": prompt}]
        else:
            turns = _messages(prompt, name["prompt"])
    if not any(m["content"].strip() for m in turns):
        raise RowError("empty prompt (every prompt message is blank)", EMPTY)
    if not chosen.strip():
        raise RowError("empty chosen", EMPTY)
    if not rejected.strip():
        raise RowError("empty rejected", EMPTY)
    if chosen == rejected:
        raise RowError("chosen == rejected", SAME)
    for field_name, text in [("prompt", m["content"]) for m in turns] + [("chosen", chosen), ("rejected", rejected)]:
        _check_unicode(text, name[field_name])
    return turns, chosen, rejected


def _check_unicode(text: str, field: str) -> None:
    """JSON escapes can spell lone surrogates (``\\ud800``): text no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"'{field}' is not valid Unicode ({e.reason} at character {e.start})", INVALID_UTF8) from None


# ---------------------------------------------------------------- tokenization
def render(tokenizer, turns: list[dict], completion: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, completion text incl. end-of-turn)."""
    if tokenizer.chat_template is None:
        prompt = "\n\n".join(m["content"] for m in turns) + "\n\n"
        return (tokenizer.bos_token or "") + prompt, completion + (tokenizer.eos_token or "")
    try:  # templates refuse some conversations (e.g. a system turn): that row, not the run
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": completion}], tokenize=False)
    except Exception as e:
        raise RowError(f"chat template refused the conversation ({type(e).__name__}: {e})", TOKENIZATION) from None
    if not full.startswith(prompt):
        raise RowError("chat template does not render the conversation as prompt + completion", TOKENIZATION)
    return prompt, full[len(prompt):]


def tokenize_triplet(tokenizer, turns, chosen: str, rejected: str,
                     max_length: int, max_prompt_length: int) -> dict:
    """Tokenize once, truncate, and check the invariants. Returns the triplet dict,
    with the untruncated lengths (``prompt_len``, ``chosen_len``, ``rejected_len``)."""
    p_text, c_text = render(tokenizer, turns, chosen)
    p_text_r, r_text = render(tokenizer, turns, rejected)
    assert p_text == p_text_r, "prompt rendered differently for chosen and rejected"
    # The template writes BOS itself; the tokenizer must not add another.
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    try:  # a tokenizer error is this row's, never the pipeline's
        prompt_ids, chosen_ids, rejected_ids = enc(p_text), enc(c_text), enc(r_text)
    except Exception as e:
        raise RowError(f"tokenizer refused the text ({type(e).__name__}: {e})", TOKENIZATION) from None
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos == prompt_ids[1]:
        raise RowError("double BOS after chat template", TOKENIZATION)
    if not chosen_ids or not rejected_ids:
        raise RowError("completion tokenizes to nothing", TOKENIZATION)
    raw = {"prompt_len": len(prompt_ids), "chosen_len": len(chosen_ids), "rejected_len": len(rejected_ids)}
    truncated = False
    if len(prompt_ids) > max_prompt_length:  # keep the end: the question is there
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)  # >= 1: config guarantees max_prompt_length < max_length
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids, truncated = chosen_ids[:room], rejected_ids[:room], True
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected identical after truncation", TRUNCATED_SAME)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids, "truncated": truncated, **raw}


def process_row(tokenizer, row: dict, *, max_length: int, max_prompt_length: int,
                column_map: dict | None = None, vocab_size: int | None = None) -> tuple[list[dict], dict]:
    """One raw row -> (prompt turns, triplet). The one code path that training
    (the Tokenize UDF) and ``data inspect`` share. ``vocab_size`` (the model's) bounds
    the ids of pre-tokenized rows. Raises RowError."""
    turns, chosen, rejected = normalize_row(row, column_map)
    if all(row.get(k) is not None for k in IDS):
        return turns, ids_triplet(row, max_length, max_prompt_length, vocab_size)
    return turns, tokenize_triplet(tokenizer, turns, chosen, rejected, max_length, max_prompt_length)


# ---------------------------------------------------------------- pre-tokenized rows
# Rows written by `simpo-ray generate` carry the sampled token ids beside the text.
# Training uses those ids as they are: decoding and re-tokenizing changes them.
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def ids_triplet(row: dict, max_length: int, max_prompt_length: int, vocab_size: int | None = None) -> dict:
    """A row's own ids -> the triplet, truncated like ``tokenize_triplet``. An id at or
    above ``vocab_size`` is refused here: in the worker it would be an index error."""
    ids = {}
    for k in IDS:
        v = row[k]
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            raise RowError(f"'{k}' must be a list of token ids", WRONG_TYPE)
        if not v:
            raise RowError(f"'{k}' is empty", EMPTY)
        if vocab_size is not None and max(v) >= vocab_size:
            raise RowError(f"'{k}' holds token id {max(v)}, beyond the model's vocabulary ({vocab_size})", WRONG_TYPE)
        ids[k] = v
    p, c, r = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
    raw = {"prompt_len": len(p), "chosen_len": len(c), "rejected_len": len(r)}
    p_t = p[-max_prompt_length:]
    room = max_length - len(p_t)
    c_t, r_t = c[:room], r[:room]
    if c_t == r_t:
        raise RowError("chosen and rejected identical after truncation", TRUNCATED_SAME)
    truncated = (len(p_t), len(c_t), len(r_t)) != (len(p), len(c), len(r))
    return {"prompt_ids": p_t, "chosen_ids": c_t, "rejected_ids": r_t, "truncated": truncated, **raw}


# ---------------------------------------------------------------- train / eval split
def prompt_group(turns: list[dict]) -> str:
    """A key shared by every pair with the same prompt (they stay in one split)."""
    return hashlib.sha256(json.dumps(turns, sort_keys=True).encode()).hexdigest()[:16]


def _unit_hash(*parts) -> float:
    key = json.dumps(list(parts), sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") / 2**32


def split_of(turns: list[dict], seed: int, eval_fraction: float) -> str:
    """Seeded split by prompt hash: the same prompt never lands in both splits."""
    return "eval" if _unit_hash(seed, turns) < eval_fraction else "train"


def length_quartiles(values) -> list[int]:
    """Quartile (0..3) of each value among ``values`` (ties go to the higher one)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    edges = np.quantile(v, [0.25, 0.5, 0.75]) if len(v) else []
    return np.searchsorted(edges, v, side="right").tolist()


def stratified_eval_groups(groups, lengths, fraction: float, seed: int) -> set:
    """Prompt groups for eval, the same share from every response-length quartile.

    ``groups`` (a prompt key per row) and ``lengths`` (response tokens per row,
    chosen + rejected). A group's length is the mean over its rows; quartiles are
    taken over groups; inside each quartile the groups are ordered by a seeded hash
    and the first round(fraction x size) go to eval. Same seed, same split.
    """
    per: dict = {}
    for g, n in zip(groups, lengths):
        s = per.setdefault(g, [0, 0])
        s[0] += int(n)
        s[1] += 1
    keys = sorted(per)
    quart = length_quartiles([per[k][0] / per[k][1] for k in keys])
    out: set = set()
    for q in range(4):
        members = sorted((k for k, qq in zip(keys, quart) if qq == q), key=lambda k: _unit_hash(seed, k))
        out.update(members[:round(fraction * len(members))])
    return out


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


# Values JSON has no type for (bytes, dates...) travel as a tag, so a bytes 'chosen'
# is refused as the wrong type, as ``data inspect`` refuses it, instead of becoming
# the text "b'...'".
NON_JSON_TAG = "__simpo_ray_non_json__"


def _json_default(value) -> dict:
    return {NON_JSON_TAG: type(value).__name__}


class Tokenize:
    """map_batches UDF (an actor: the tokenizer loads once). Raw rows -> triplets."""

    COLUMNS = ("source", "row", "error", "reason", "split", "group", "resp_len",
               "prompt_ids", "chosen_ids", "rejected_ids", "truncated")

    def __init__(self, name_or_path: str, tiny_spec: dict, max_length: int,
                 max_prompt_length: int, seed: int, eval_fraction: float,
                 column_map: dict | None = None):
        from transformers import AutoTokenizer

        from simpo_ray.models import resolve_model_path

        path = resolve_model_path(name_or_path, tiny_spec)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.kwargs = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                           column_map=column_map or None, vocab_size=model_vocab_size(path))
        self.seed, self.eval_fraction = seed, eval_fraction

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in self.COLUMNS}
        for source, n, raw, err, reason in zip(batch["source"], batch["row"], batch["raw"],
                                               batch["error"], batch["reason"]):
            trip, split, group = None, "train", ""
            if not err:
                try:
                    turns, trip = process_row(self.tok, json.loads(raw), **self.kwargs)
                    split = split_of(turns, self.seed, self.eval_fraction)
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
            out["resp_len"].append(len(trip["chosen_ids"]) + len(trip["rejected_ids"]) if trip else 0)
            out["truncated"].append(bool(trip and trip["truncated"]))
        return out


def model_vocab_size(path: str) -> int | None:
    """The model's embedding rows (from its config; None when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)
    except Exception:  # no config (tokenizer-only folder): the worker's load will say so
        return None


def _assign_split(table, eval_groups: list):
    """map_batches UDF (pyarrow): split = eval for the chosen prompt groups."""
    import pyarrow as pa
    import pyarrow.compute as pc

    is_eval = pc.is_in(table["group"], value_set=pa.array(eval_groups, type=pa.string()))
    split = pc.if_else(is_eval, pa.scalar("eval"), pa.scalar("train"))
    return table.set_column(table.schema.get_field_index("split"), "split", split)


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
    """Read, validate, tokenize and split with Ray Data; materialized once.

    Returns {"train": Dataset, "eval": Dataset | None, "stats": dict}; the datasets
    hold ``KEEP`` columns, materialized (no lazy stage left, so every epoch streams
    the same blocks in the same order). ``stats["dropped"]`` counts dropped rows per
    reason.
    """
    import ray.data
    from ray.data.expressions import col

    d = cfg.data
    files = expand_files(d.train_files)
    eval_files = expand_files(d.eval_files) if d.eval_files else []
    fraction = 0.0 if eval_files else d.eval_fraction

    def pipeline(paths, frac):
        ds = _with_order(ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)))
        ds = ds.map_batches(read_files_batch, batch_size=1)
        ds = ds.map_batches(Tokenize, batch_size=256, concurrency=1,
                            fn_constructor_kwargs=dict(
                                name_or_path=cfg.model.name_or_path,
                                tiny_spec=dataclasses.asdict(cfg.model.tiny), max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length, seed=d.seed,
                                eval_fraction=frac, column_map=dict(d.column_map)))
        return ds.materialize()

    tokenized = pipeline(files, fraction)
    parts = [tokenized] + ([pipeline(eval_files, 1.0)] if eval_files else [])
    errors = []
    for part in parts:
        bad = part.filter(expr=col("error") != "").select_columns(["source", "row", "error", "reason"])
        errors += [(r["source"], r["row"], r["error"], r["reason"]) for r in bad.take_all()]
    dropped = summarize_errors(errors, strict=d.strict)

    good = tokenized.filter(expr=col("error") == "")
    split_rule = "separate files" if eval_files else "seeded hash of the prompt"
    if d.eval_stratify and fraction > 0:
        cols = {"group": [], "resp_len": []}
        for b in good.select_columns(list(cols)).iter_batches(batch_size=4096, batch_format="numpy"):
            for k in cols:
                cols[k] += b[k].tolist()
        chosen = sorted(stratified_eval_groups(cols["group"], cols["resp_len"], fraction, d.seed))
        good = good.map_batches(_assign_split, batch_format="pyarrow",
                                fn_kwargs={"eval_groups": chosen}).materialize()
        split_rule = "seeded, stratified by response-length quartile"
    train = good.filter(expr=col("split") == "train")
    n_train = train.count()
    n_trunc = int(train.sum("truncated") or 0) if n_train else 0
    if n_train == 0:
        raise DataError(f"no training pairs left from {', '.join(files)}")
    if d.shuffle:  # once, seeded; per-epoch order comes from shuffle_args() in the worker
        train = train.random_shuffle(seed=d.seed)
    train = train.select_columns(KEEP).materialize()
    mean_pair_tokens = _mean_pair_tokens(train) if d.token_budget else None
    if eval_files:
        eval_ds = parts[1].filter(expr=col("error") == "")
    else:
        eval_ds = good.filter(expr=col("split") == "eval") if fraction > 0 else None
    if eval_ds is not None:
        eval_ds = eval_ds.select_columns(KEEP).materialize()
    n_eval = eval_ds.count() if eval_ds is not None else 0
    settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                "seed": d.seed, "eval_fraction": fraction, "tokenizer": _tokenizer_hash(tokenizer_path),
                "column_map": dict(sorted(d.column_map.items())), "eval_stratify": d.eval_stratify}
    return {
        "train": train, "eval": eval_ds if n_eval else None,
        "stats": {"train_pairs": n_train, "eval_pairs": n_eval, "dropped": dropped,
                  "dropped_total": sum(dropped.values()), "truncated_pairs": n_trunc,
                  "split": split_rule, "files": files + eval_files,
                  **({"mean_pair_tokens": mean_pair_tokens} if mean_pair_tokens else {}),
                  "fingerprint": fingerprint(files + eval_files, settings)},
    }


def _mean_pair_tokens(ds) -> float:
    """Mean packed cost of a pair (2 x prompt + chosen + rejected), what
    ``data.token_budget`` counts."""
    total = n = 0
    for b in ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter_batches(
            batch_size=4096, batch_format="numpy"):
        for p, c, r in zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]):
            total, n = total + 2 * len(p) + len(c) + len(r), n + 1
    return total / max(n, 1)


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
    """``iter_batches`` keyword arguments for one epoch's order on one rank.

    Determinism (Ray 2.60): a materialized dataset streams the same blocks in the same
    order every epoch; ``streaming_split(n, equal=True)`` assigns them greedily to the
    rank with the fewest rows so far, which is deterministic for a fixed block
    sequence when no locality hints are used (``ingest_config()`` turns them off);
    the local shuffle buffer is a numpy Generator seeded here, so the sequence of
    batches on each rank is a function of (data, seed, epoch, world size) and a
    resumed run sees the same batches. Rows stay on the same rank across epochs (the
    global shuffle happens once, in ``prepare_datasets``); the order within a rank's
    stream changes per epoch, mixing over ``data.shuffle_buffer_size`` rows.
    """
    if not data_cfg.shuffle:
        return {}
    return {"local_shuffle_buffer_size": max(int(data_cfg.shuffle_buffer_size), int(batch_size)),
            "local_shuffle_seed": epoch_seed(data_cfg.seed, epoch)}


def ingest_config():
    """A ``ray.train.DataConfig`` whose split to workers is deterministic even across
    nodes: ``preserve_order`` also makes Ray ignore locality hints (which depend on
    where blocks happen to live). Pass as ``TorchTrainer(dataset_config=...)``."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options=opts)
