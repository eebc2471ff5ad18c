"""Generation probes: what the live policy writes, during training.

Pairwise accuracy can climb while replies stop ending, loop or go empty (the most common
SimPO failure users report). Every ``eval.generate_every`` steps, at step 0 and at the
end, every rank generates greedily for its share of a fixed, seeded set of held-out
prompts (``pick_prompts``, chosen once on the driver) with the live ZeRO-3 weights:
Hugging Face ``generate(..., synced_gpus=True)`` keeps the ranks stepping in lockstep
(each forward gathers one layer's shards at a time; no rank ever holds the full
weights). Generation stops at the training stop ids (what completions end with).

Per probe, in the metrics line (``GEN_KEYS``): the median reply length in tokens and in
characters, and the share of replies that are unfinished (hit ``generate_max_tokens``
without a stop id), that loop (a token ``REPEAT_N``-gram occurring ``REPEAT_MIN`` times
or more) and that are empty (nothing but whitespace before the stop id). The texts go
to ``generations.jsonl`` in the run folder; ``gen/seconds`` is the time the probe took.
``generation_alarm`` compares each probe
with the step-0 one: ``alarm/generation``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

REPEAT_N, REPEAT_MIN = 4, 3
GEN_KEYS = ("gen/length_median", "gen/length_chars_median", "gen/unfinished_rate", "gen/repeat_rate",
            "gen/empty_rate")
RATE_KEYS = ("gen/unfinished_rate", "gen/repeat_rate", "gen/empty_rate")
GENERATIONS_FILE = "generations.jsonl"
GENERATION_ALARM = "alarm/generation"


def pick_prompts(eval_ds, n: int) -> list:
    """``n`` distinct held-out prompts, as [{"id", "prompt_ids"}]: the first ones of the
    held-out split (itself a seeded hash split), so the same data and seed give the
    same probes on every run. Driver side."""
    if eval_ds is None or n <= 0:
        return []
    out, seen = [], set()
    for row in eval_ds.take(4 * n):
        ids = [int(x) for x in row["prompt_ids"]]
        if tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        out.append({"id": f"{row.get('source', '')}:{row.get('row', len(out))}", "prompt_ids": ids})
        if len(out) == n:
            break
    return out


def has_loop(tokens: list, n: int = REPEAT_N, times: int = REPEAT_MIN) -> bool:
    """True if some ``n``-gram of ``tokens`` occurs ``times`` times or more."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def reply(new_tokens: list, stop_ids, pad_id: int, text_of) -> dict:
    """One generation's record: the tokens up to the first stop id, its text, finished
    or not, a loop or not, empty or not."""
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(new_tokens) if t in stops), None)
    tokens = new_tokens if cut is None else new_tokens[:cut]
    if cut is None:  # a rank that finished early pads while the others step (synced_gpus)
        while tokens and tokens[-1] == pad_id and pad_id not in stops:
            tokens = tokens[:-1]
    text = text_of(tokens)
    return {"tokens": len(tokens), "chars": len(text), "finished": cut is not None,
            "repeat": has_loop(tokens), "empty": not text.strip(), "text": text}


def summarize(records: list) -> dict:
    """The ``gen/`` metrics of one probe's records."""
    n = max(len(records), 1)
    return {"gen/length_median": float(statistics.median([r["tokens"] for r in records] or [0])),
            "gen/length_chars_median": float(statistics.median([r["chars"] for r in records] or [0])),
            "gen/unfinished_rate": sum(not r["finished"] for r in records) / n,
            "gen/repeat_rate": sum(r["repeat"] for r in records) / n,
            "gen/empty_rate": sum(r["empty"] for r in records) / n}


def due(cfg, step: int, last: bool, eval_due: bool) -> bool:
    """Whether this report carries a probe: step 0, the end, and every
    ``eval.generate_every`` steps (default: with every held-out evaluation)."""
    every = cfg.eval.generate_every
    if every == 0:
        return False
    if every is None:
        return eval_due or step == 0 or last
    return step == 0 or last or step % every == 0


_TOKENIZERS = {}


def _tokenizer(path: str, trust: bool):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return _TOKENIZERS[path]


def probe(engine, cfg, plan, model_path: str, step: int) -> dict:
    """Generate on every rank (collective), gather the records everywhere, append them
    to ``generations.jsonl`` (rank 0) and return the ``gen/`` metrics (the same on
    every rank, so an alarm stop is agreed)."""
    import torch
    import torch.distributed as dist

    prompts = plan.probe_prompts[:cfg.eval.generate_prompts]
    if not prompts:
        return {}
    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-len(prompts) // world)
    mine = prompts[rank::world]
    # Every rank generates the same number of rows (a stand-in repeats a prompt) in
    # lockstep: a rank without work would leave the others waiting for its shards.
    batch = mine + [prompts[0]] * (per_rank - len(mine))
    width = max(len(p["prompt_ids"]) for p in batch)
    pad = plan.pad_id
    ids = torch.tensor([[pad] * (width - len(p["prompt_ids"])) + p["prompt_ids"] for p in batch])
    mask = torch.tensor([[0] * (width - len(p["prompt_ids"])) + [1] * len(p["prompt_ids"]) for p in batch])
    lm = engine.module.lm
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        out = lm.generate(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                          max_new_tokens=cfg.eval.generate_max_tokens, do_sample=False, use_cache=True,
                          eos_token_id=list(plan.stop_ids) or None, pad_token_id=pad,
                          synced_gpus=world > 1 and cfg.deepspeed.stage == 3)
    if was_training:
        engine.train()
    tok = _tokenizer(model_path, cfg.model.trust_remote_code)
    text_of = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    records = [dict(reply(out[i, width:].tolist(), plan.stop_ids, pad, text_of), prompt_id=p["id"])
               for i, p in enumerate(mine)]
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    every = sorted((r for part in gathered for r in part), key=lambda r: r["prompt_id"])
    if rank == 0:
        with open(Path(plan.run_dir) / GENERATIONS_FILE, "a") as f:
            for r in every:
                f.write(json.dumps({"step": step, "prompt_id": r["prompt_id"], "text": r["text"],
                                    "tokens": r["tokens"], "finished": r["finished"]}) + "\n")
    # gen/seconds: this rank's time in the probe (benchmarks/probes_cost.py adds them up).
    return {**summarize(every), "gen/seconds": round(time.perf_counter() - started, 3)}


def generation_alarm(report: dict, state, e, rank: int = 0):
    """``alarm/generation``: a rate in ``RATE_KEYS`` risen by more than
    ``eval.alarm_rate_rise`` over its step-0 value, or the median length moved by more
    than a factor ``eval.alarm_length_factor`` either way. Printed once; the step-0
    values are kept in the checkpoint state. -> the new state."""
    if "gen/length_median" not in report:
        return state
    start = dict(state.gen_start) or {k: report[k] for k in GEN_KEYS}
    state = state.replace(gen_start=start)
    why = [f"{k.removeprefix('gen/')} {start[k]:.2f} -> {report[k]:.2f}" for k in RATE_KEYS
           if report[k] - start[k] > e.alarm_rate_rise]
    before, now = max(start["gen/length_median"], 1.0), max(report["gen/length_median"], 1.0)
    if max(now / before, before / now) > e.alarm_length_factor:
        why.append(f"median length {start['gen/length_median']:.0f} -> {report['gen/length_median']:.0f} tokens")
    report[GENERATION_ALARM] = bool(why)
    if why and not state.gen_alarm_printed:
        state = state.replace(gen_alarm_printed=True)
        if rank == 0:
            print(f"[simpo-ray] WARNING: generations changed since step 0 ({'; '.join(why)}; eval.alarm_rate_rise="
                  f"{e.alarm_rate_rise}, eval.alarm_length_factor={e.alarm_length_factor}): read "
                  f"{GENERATIONS_FILE}; consider a lower lr or a larger gamma_beta_ratio / an sft_weight", flush=True)
    return state
