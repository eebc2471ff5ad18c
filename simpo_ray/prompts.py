"""The prompt pipeline of on-policy generation: raw rows -> prompt turns -> prompt ids.

Prompts are read with Ray Data (file order kept), rendered and tokenized exactly as
training renders them (``tokens.Streams``), keyed by a prompt id (the row's ``prompt_id``
column, else a hash of the turns) and deduplicated by it. Every sample's seed is a pure
function of (seed, round, prompt id, sample index): results do not depend on which actor
served a prompt or in which order.
"""

from __future__ import annotations

import hashlib
import json

from simpo_ray.rows import BAD_CONVERSATION, EMPTY, MISSING, WRONG_TYPE, _messages, prompt_group
from simpo_ray.tokens import streams_for
from simpo_ray.sources import RowError, expand_files

PROMPT_COLUMNS = ("source", "row", "error", "reason", "prompt_id", "prompt", "prompt_ids")


def sample_seed(seed: int, round_index: int, prompt_id: str, sample: int) -> int:
    """The seed of one sample: a pure function of its key (31 bits, what engines accept)."""
    key = f"simpo-ray-sample:{seed}:{round_index}:{prompt_id}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def prompt_turns(row: dict, column_map: dict | None = None) -> list[dict]:
    """A row's prompt as chat messages: a ``prompt`` string or message list, or the
    turns before the last message of an UltraFeedback-style ``chosen`` conversation."""
    name = (column_map or {}).get("prompt", "prompt")
    prompt = row.get(name)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt", EMPTY)
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, name)
    if prompt is not None:
        raise RowError(f"'{name}' must be text or a list of messages", WRONG_TYPE)
    conv = row.get((column_map or {}).get("chosen", "chosen"))
    if isinstance(conv, list) and len(conv) > 1:
        turns = _messages(conv, "chosen")[:-1]
        if turns[-1]["role"] == "assistant":
            raise RowError("the prompt turns of 'chosen' end with the assistant", BAD_CONVERSATION)
        return turns
    raise RowError(f"missing field '{name}'", MISSING)


def prompt_id_of(row: dict, turns: list[dict]) -> str:
    """The row's ``prompt_id`` column when it has one, else a hash of the prompt."""
    pid = row.get("prompt_id")
    return str(pid) if pid not in (None, "") else prompt_group(turns)


def encode_prompt(tokenizer, turns: list[dict], max_prompt_length: int, add_bos: str = "auto",
                  allow_special_tokens_in_text: bool = False) -> list[int]:
    """Prompt ids exactly as training sees them (``tokens.Streams``: the chat template
    with the generation prompt, the BOS policy, special-token text as text), keeping
    the end of long prompts as training does."""
    st = streams_for(tokenizer, add_bos, allow_special_tokens_in_text)
    return st.truncate_prompt(st.prompt_ids(st.cap_turns(turns, max_prompt_length)), max_prompt_length)


class PromptTokenize:
    """map_batches UDF (an actor: the tokenizer loads once). Raw rows -> prompts."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, column_map: dict | None = None,
                 add_bos: str = "auto", allow_special_tokens_in_text: bool = False):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_prompt_length, self.column_map = max_prompt_length, column_map or None
        self.policy = (add_bos, allow_special_tokens_in_text)

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in PROMPT_COLUMNS}
        for source, n, raw, err, reason in zip(batch["source"], batch["row"], batch["raw"],
                                               batch["error"], batch["reason"]):
            pid, turns, ids = "", [], []
            if not err:
                try:
                    row = json.loads(raw)
                    turns = prompt_turns(row, self.column_map)
                    pid = prompt_id_of(row, turns)
                    ids = encode_prompt(self.tok, turns, self.max_prompt_length, *self.policy)
                except RowError as e:
                    err, reason = str(e), e.reason
            for k, v in (("source", source), ("row", int(n)), ("error", err), ("reason", reason),
                         ("prompt_id", pid), ("prompt", json.dumps(turns)), ("prompt_ids", ids)):
                out[k].append(v)
        return out


def read_prompts(cfg, tokenizer_path: str) -> tuple[list[dict], dict]:
    """Prompts in file order as [{"prompt_id", "prompt", "prompt_ids"}], deduplicated
    by prompt id and capped at ``generate.max_prompts``; plus counts. Malformed rows
    stop a strict run naming file, row and reason (``data.strict=false``: counted)."""
    import ray.data

    from simpo_ray.data import read_files_batch, summarize_errors

    files = expand_files(cfg.generate.prompt_files or cfg.data.train_files)
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files))
    ds.context.execution_options.preserve_order = True  # file order, whatever finishes first
    ds = ds.map_batches(read_files_batch, batch_size=1).map_batches(
        PromptTokenize, batch_size=256, concurrency=1,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, max_prompt_length=cfg.data.max_prompt_length,
                                   column_map=dict(cfg.data.column_map), add_bos=cfg.data.add_bos,
                                   allow_special_tokens_in_text=cfg.data.allow_special_tokens_in_text))
    prompts, errors, seen = [], [], set()
    duplicates = 0
    for r in ds.iter_rows():
        if r["error"]:
            errors.append((r["source"], r["row"], r["error"], r["reason"]))
        elif r["prompt_id"] in seen:
            duplicates += 1
        else:
            seen.add(r["prompt_id"])
            prompts.append({"prompt_id": r["prompt_id"], "prompt": json.loads(r["prompt"]),
                            "prompt_ids": [int(t) for t in r["prompt_ids"]]})
    dropped = summarize_errors(errors, strict=cfg.data.strict)
    cap = cfg.generate.max_prompts
    return prompts[:cap] if cap else prompts, {
        "files": files, "rows_dropped": dropped, "duplicate_prompts": duplicates,
        "prompts_available": len(prompts)}
