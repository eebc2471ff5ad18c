"""Padded vs packed batches on an UltraFeedback-like length mix: padding waste and
training tokens/s of the tiny Llama model on CPU.

Lengths: log-normal prompts and responses with long right tails, the shape of
UltraFeedback-binarized under a Llama-3 tokenizer (prompt median ~150 tokens,
responses ~300, tails past 2k), scaled by 1/4 so a CPU run stays short:
max_length 512, max_prompt_length 256, truncated the way rows.tokenize_triplet does.

Modes (the same micro-batches of pairs for all three):
  padded   collate_pairs: one row per sequence, padded to the longest (multiple of 8);
           the baseline.
  packed   collate_packed(max_tokens=2 x max_length), the data.packing default: rows of
           at most 2 x max_length tokens, attention_mask=None + restarting
           position_ids (transformers builds the block-diagonal mask for SDPA).
           The waste table also shows rows of at most max_length.
  one-row  collate_packed(max_tokens=None): every sequence in one row, the layout
           flash-attn varlen uses on GPU; on CPU SDPA it costs a dense L x L mask.

Waste = pad slots / all slots, over every micro-batch of the whole set. Tokens/s =
real (non-pad) tokens / wall time of forward + backward, the fastest of --repeats
tries per batch (load from other processes only ever adds), the modes interleaved
batch by batch so drifting load hits all of them alike; an AdamW step follows each
batch, untimed. Ratios against padded. The first batch is a warm-up that checks
that the three losses agree.

    python benchmarks/packing.py              # the table in benchmarks/README.md
    python benchmarks/packing.py --smoke      # seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import time

import torch

from simpo_ray.collate import collate_packed, collate_pairs, pack_rows
from simpo_ray.config import TinyModelConfig
from simpo_ray.logps import packed_sequence_logps, sequence_logps
from simpo_ray.losses import simpo_loss
from simpo_ray.tiny import build_model

MODES = ("padded", "packed", "one-row")


def ultrafeedback_like(n: int, seed: int, max_length: int = 512, max_prompt: int = 256, scale: float = 0.25):
    """n pairs as (prompt, chosen, rejected) token lists, truncated like the pipeline."""
    rng = random.Random(seed)
    ln = lambda median, sigma: max(1, int(rng.lognormvariate(0, sigma) * median * scale))  # noqa: E731
    out = []
    for _ in range(n):
        p, c, r = ln(150, 0.9), ln(300, 0.75), ln(260, 0.85)
        prompt = [1] + [rng.randrange(6, 262) for _ in range(p)]
        chosen = [rng.randrange(6, 262) for _ in range(c)] + [2]
        rejected = [rng.randrange(6, 262) for _ in range(r)] + [2]
        prompt = prompt[-max_prompt:]
        room = max_length - len(prompt)
        out.append((prompt, chosen[:room], rejected[:room]))
    return out


def batches(pairs, micro: int):
    return [pairs[i:i + micro] for i in range(0, len(pairs) - micro + 1, micro)]


def collate(mode: str, batch, max_length: int) -> dict:
    P, C, R = (list(x) for x in zip(*batch))
    if mode == "padded":
        return collate_pairs(P, C, R, pad_id=0, pad_to_multiple_of=8)
    return collate_packed(P, C, R, pad_id=0, max_tokens=2 * max_length if mode == "packed" else None)


def waste(pairs, micro: int, max_length: int) -> dict:
    """Pad share per mode over all micro-batches (lengths only, no tensors)."""
    slots = dict.fromkeys(MODES + ("packed-1x",), 0)
    real = 0
    for b in batches(pairs, micro):
        lengths = [len(p) + len(c) for p, c, _ in b] + [len(p) + len(r) for p, _, r in b]
        real += sum(lengths)
        slots["padded"] += len(lengths) * (-(-max(lengths) // 8) * 8)
        for key, cap in (("packed", 2 * max_length), ("packed-1x", max_length)):
            rows, L = pack_rows(lengths, cap, 8)
            slots[key] += len(rows) * L
        slots["one-row"] += pack_rows(lengths, None, 8)[1]
    return {m: 1 - real / s for m, s in slots.items()}


def step_logps(model, mode: str, b: dict, n_seq: int):
    if mode == "padded":
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return sequence_logps(logits, b["labels"])
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None,
                   use_cache=False).logits
    return packed_sequence_logps(logits, b["labels"], b["sequence_index"], n_seq)


def loss_of(logps):
    n = logps.shape[0] // 2
    return simpo_loss(logps[:n], logps[n:], beta=2.5, gamma_beta_ratio=0.5)[0].mean()


def throughput(pairs, micro: int, max_length: int, n_batches: int, spec: dict, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    base = build_model(spec).float()
    base.set_attn_implementation("sdpa")
    models = {m: copy.deepcopy(base) for m in MODES}
    opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in MODES}
    work = batches(pairs, micro)[: n_batches + 1]
    secs, toks, first = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0), {}
    for i, batch in enumerate(work):
        for mode in MODES:
            b = collate(mode, batch, max_length)
            dt = float("inf")
            for _ in range(repeats if i else 1):
                opts[mode].zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = loss_of(step_logps(models[mode], mode, b, 2 * len(batch)))
                loss.backward()
                dt = min(dt, time.perf_counter() - t0)
            opts[mode].step()
            if i == 0:
                first[mode] = loss.item()  # warm-up batch: checked, not timed
                continue
            secs[mode] += dt
            real = b["attention_mask"].sum() if mode == "padded" else (b["sequence_index"] >= 0).sum()
            toks[mode] += int(real)
    diff = max(abs(first[m] - first["padded"]) for m in MODES)
    return {"tokens_per_s": {m: toks[m] / secs[m] for m in MODES}, "first_loss_max_diff": diff,
            "timed_batches": len(work) - 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2048, help="pairs for the waste table")
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8, 16], help="pairs per micro-batch")
    ap.add_argument("--time-micro", type=int, default=8, help="micro-batch size for the tokens/s run")
    ap.add_argument("--batches", type=int, default=16, help="timed micro-batches per mode")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="tries per timed batch (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    a = ap.parse_args(argv)
    if a.smoke:
        a.pairs, a.micro, a.time_micro, a.batches, a.repeats = 64, [4], 4, 2, 1
    torch.set_num_threads(a.threads)
    spec = dataclasses.asdict(TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512))
    pairs = ultrafeedback_like(a.pairs, seed=0, max_length=a.max_length, max_prompt=a.max_length // 2)
    lengths = sorted(len(p) + len(c) for p, c, _ in pairs) + sorted(len(p) + len(r) for p, _, r in pairs)
    resp = sorted(len(r) for _, c, r in pairs for r in (c, r))
    print(f"{a.pairs} pairs; sequence tokens mean {sum(lengths) / len(lengths):.0f}; response tokens "
          f"p50 {resp[len(resp) // 2]} p90 {resp[int(len(resp) * 0.9)]} max {resp[-1]}")
    rows = {m: waste(pairs, m, a.max_length) for m in a.micro}
    print("\n| pairs per micro-batch | padded waste | packed, rows <= 2 x max_length | packed, rows <= max_length "
          "| one row |")
    print("|---:|---:|---:|---:|---:|")
    for m, w in rows.items():
        print(f"| {m} | {w['padded']:.1%} | {w['packed']:.1%} | {w['packed-1x']:.1%} | {w['one-row']:.1%} |")
    t = throughput(pairs, a.time_micro, a.max_length, a.batches, spec, a.repeats)
    tps = t["tokens_per_s"]
    print(f"\ntokens/s, {a.time_micro} pairs per micro-batch, {t['timed_batches']} timed batches "
          f"(first-batch losses agree to {t['first_loss_max_diff']:.1e}):")
    print("\n| mode | real tokens/s | ratio vs padded |")
    print("|---|---:|---:|")
    for m in MODES:
        print(f"| {m} | {tps[m]:.0f} | {tps[m] / tps['padded']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"waste": rows, "throughput": t, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
