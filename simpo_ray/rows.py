"""Preference rows, pure: the accepted shapes, the reasons a row is refused, and the
one row -> tokenized triplet path that training, ``data inspect`` and generation share.

Triplet contract: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` where the last two
are completion ids only; chosen and rejected share exactly the same prompt tokens, and
``prompt_ids + chosen_ids`` is the one-pass tokenization of the rendered conversation
(``simpo_ray.tokens``: BOS policy, completions end with the end-of-turn token).
A bad row raises ``RowError`` with a message naming the column and a ``reason``
category (one of ``REASONS``); ``simpo_ray.data`` turns it into a counted row.
"""

from __future__ import annotations

import hashlib
import json

from simpo_ray.sources import RowError
from simpo_ray.tokens import TOKENIZATION, streams_for

# Reason categories: counts are kept per category, messages carry the detail.
INVALID_UTF8, INVALID_JSON, NOT_OBJECT = "invalid UTF-8", "invalid JSON", "not a JSON object"
MISSING, WRONG_TYPE, EMPTY = "missing field", "wrong type", "empty text"
SAME, PROMPT_DIFFERS, NON_TEXT = "chosen == rejected", "prompt differs", "non-text content"
BAD_CONVERSATION = "bad conversation"
# A whole file the parser refuses (not a row): stops the run in both modes.
UNREADABLE = "unreadable file"
# Not malformed input but a consequence of max_length: dropped and counted in both modes.
TRUNCATED_SAME = "identical after truncation"
# Pair hygiene (data.drop_ties, data.dedup): well-formed rows that teach nothing or
# teach the same thing twice; dropped and counted in both modes.
TIE, DUPLICATE = "tie", "duplicate"
NON_FATAL = frozenset({TRUNCATED_SAME, TIE, DUPLICATE})
REASONS = (INVALID_UTF8, INVALID_JSON, NOT_OBJECT, MISSING, WRONG_TYPE, EMPTY, SAME, PROMPT_DIFFERS,
           NON_TEXT, BAD_CONVERSATION, TOKENIZATION, TRUNCATED_SAME, TIE, DUPLICATE)
FIELDS = ("prompt", "chosen", "rejected")

# Values JSON has no type for (bytes, dates...) travel as a tag, so a bytes 'chosen'
# is refused as the wrong type, as ``data inspect`` refuses it, instead of becoming
# the text "b'...'" (``data.read_files_batch`` writes the tag).
NON_JSON_TAG = "__simpo_ray_non_json__"


# ---------------------------------------------------------------- row shapes
def _kind(value) -> str:
    """The type of a value as the user wrote it (``NON_JSON_TAG`` names a non-JSON one)."""
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
def tokenize_triplet(tokenizer, turns, chosen: str, rejected: str, max_length: int, max_prompt_length: int,
                     add_bos: str = "auto", allow_special_tokens_in_text: bool = False) -> dict:
    """Tokenize the conversation in one pass (``simpo_ray.tokens``), truncate, and check
    the invariants. Returns the triplet dict, with the untruncated lengths
    (``prompt_len``, ``chosen_len``, ``rejected_len``; at least the cap for text cut
    before tokenizing) and ``notes`` (the non-fatal reasons that applied)."""
    st = streams_for(tokenizer, add_bos, allow_special_tokens_in_text)
    c_cap, cut_turns = st.char_cap(max_length), st.cap_turns(turns, max_prompt_length)
    enc = st.encode(cut_turns, [chosen[:c_cap], rejected[:c_cap]])
    prompt_ids, (chosen_ids, rejected_ids) = enc["prompt_ids"], enc["completions"]
    raw = {"prompt_len": len(prompt_ids), "chosen_len": len(chosen_ids), "rejected_len": len(rejected_ids)}
    truncated = cut_turns != turns or max(len(chosen), len(rejected)) > c_cap
    if len(prompt_ids) > max_prompt_length:  # keep the end: the question is there (and BOS)
        prompt_ids, truncated = st.truncate_prompt(prompt_ids, max_prompt_length), True
    room = max_length - len(prompt_ids)  # >= 1: config guarantees max_prompt_length < max_length
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids, truncated = chosen_ids[:room], rejected_ids[:room], True
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected identical after truncation", TRUNCATED_SAME)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "truncated": truncated, "notes": sorted(enc["notes"]), **raw}


def process_row(tokenizer, row: dict, *, max_length: int, max_prompt_length: int,
                column_map: dict | None = None, vocab_size: int | None = None,
                add_bos: str = "auto", allow_special_tokens_in_text: bool = False,
                drop_ties: bool = True) -> tuple[list[dict], dict]:
    """One raw row -> (prompt turns, triplet). The one code path that training
    (the Tokenize UDF) and ``data inspect`` share. ``vocab_size`` (the model's) bounds
    the ids of pre-tokenized rows. The triplet's ``pair_key`` identifies the pair up to
    whitespace, case and invisible characters (``Duplicates``). Raises RowError."""
    turns, chosen, rejected = normalize_row(row, column_map)
    if drop_ties and canonical(chosen) == canonical(rejected):
        raise RowError("chosen and rejected differ only in whitespace, case or invisible characters", TIE)
    if all(row.get(k) is not None for k in IDS):
        trip = ids_triplet(row, max_length, max_prompt_length, vocab_size)
    else:
        trip = tokenize_triplet(tokenizer, turns, chosen, rejected, max_length, max_prompt_length,
                                add_bos, allow_special_tokens_in_text)
    return turns, dict(trip, pair_key=pair_key(turns, chosen, rejected))


def canonical(text: str) -> str:
    """Text up to what a reader cannot see: Unicode NFKC (NBSP is a space), format
    characters removed (zero-width space, joiners, BOM), case folded, whitespace runs
    collapsed."""
    import unicodedata

    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return " ".join(text.casefold().split())


def pair_key(turns: list[dict], chosen: str, rejected: str) -> str:
    """The pair's identity for de-duplication: its canonical prompt turns, chosen, rejected."""
    canon = [[m["role"], canonical(m["content"])] for m in turns] + [canonical(chosen), canonical(rejected)]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()[:24]


class Duplicates:
    """The first occurrence of each pair key is kept; a later one (file order) is a
    ``DUPLICATE`` naming the row it repeats. One rule for training and ``data inspect``."""

    def __init__(self):
        self.first: dict = {}

    def check(self, key: str, source: str, row: int) -> RowError | None:
        """Call once per row, in file order."""
        if key not in self.first:
            self.first[key] = (source, row)
            return None
        where = self.first[key]
        return RowError(f"duplicate of {where[0]} row {where[1]} (same pair up to whitespace and case)", DUPLICATE)


def row_options(d, vocab_size: int | None = None) -> dict:
    """``process_row``'s keyword arguments from a ``DataConfig``: the one place training,
    ``data inspect`` and ``data tokens`` take them from (plain values: they cross Ray)."""
    return dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                column_map=dict(d.column_map) or None, vocab_size=vocab_size, add_bos=d.add_bos,
                allow_special_tokens_in_text=d.allow_special_tokens_in_text, drop_ties=d.drop_ties)


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
    return {"prompt_ids": p_t, "chosen_ids": c_t, "rejected_ids": r_t, "truncated": truncated, "notes": [], **raw}


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
