"""Padding waste at real lengths: fixed pair counts vs the default token budget, plain
packed rows vs each pair's prompt once. Counts only (no model, deterministic).

Lengths: ``benchmarks/packing.py``'s UltraFeedback-like mix at full scale
(``--length-scale 1.0``: prompt median ~150 tokens, responses ~300, tails past 2k),
max_length 1024 / max_prompt_length 512 by default, truncated like the pipeline.

Layouts, each over the whole set, micro-batches in data order:
  fixed-N     N pairs per micro-batch (data.token_budget: null), packed rows of at most
              2 x max_length (collate_packed / pack_rows).
  budget      data.token_budget: auto for micro_batch_size N (as budget.make_plan
              resolves it), the same rows (a dense block-diagonal mask needs them short).
  one-row     the budget, every sequence in one row: what attention per segment (the
              default) and flash-attn varlen get (collate.packed_model_inputs).
  shared      the budget with each pair's prompt once (data.share_prompt; the
              default where exact), one row of p|c|p'|r groups.

Waste = pad slots / all slots. ``slots per pair`` counts what the model computes
(padding included), so the shared prompt's saving shows next to the waste.

    python benchmarks/waste.py [--pairs 4096] [--micro 4 8 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packing import ultrafeedback_like  # noqa: E402

from simpo_ray.budget import auto_token_budget  # noqa: E402
from simpo_ray.collate import pack_rows, pair_cost, token_budget_batches  # noqa: E402
from simpo_ray.segments import pack_shared_rows  # noqa: E402
from simpo_ray.tables import markdown_table  # noqa: E402


def auto_budget(pairs, micro: int, share: bool) -> int:
    """What budget.make_plan resolves data.token_budget: auto to, for these pairs."""
    costs = [pair_cost(len(p), len(c), len(r), share_prompt=share) for p, c, r in pairs]
    return auto_token_budget(micro, sum(costs) / len(costs), max(costs))


def measure(pairs, micro: int, max_length: int, mode: str) -> dict:
    share = mode == "shared"
    cap = None if mode in ("one-row", "shared") else 2 * max_length
    if mode.startswith("fixed"):
        groups = [pairs[i:i + micro] for i in range(0, len(pairs) - micro + 1, micro)]
        budget = None
    else:
        budget = auto_budget(pairs, micro, share)
        cols = {"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                "rejected_ids": [r for _, _, r in pairs]}
        groups = [list(zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]))
                  for b in token_budget_batches([cols], budget, share_prompt=share)]
    real = slots = n_pairs = 0
    for g in groups:
        P, C, R = (list(x) for x in zip(*g))
        if share:
            rows, L = pack_shared_rows(P, C, R, max_tokens=cap)
            real += sum(pair_cost(len(p), len(c), len(r), share_prompt=True) for p, c, r in g)
        else:
            lengths = [len(p) + len(c) for p, c in zip(P, C)] + [len(p) + len(r) for p, r in zip(P, R)]
            rows, L = pack_rows(lengths, cap)
            real += sum(lengths)
        slots += len(rows) * L
        n_pairs += len(g)
    return {"mode": mode, "micro": micro, "budget": budget, "micro_batches": len(groups),
            "pairs_per_micro": round(n_pairs / len(groups), 2), "waste": round(1 - real / slots, 4),
            "slots_per_pair": round(slots / n_pairs, 1)}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--length-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    pairs = ultrafeedback_like(a.pairs, a.seed, a.max_length, a.max_length // 2, a.length_scale)
    out = [measure(pairs, m, a.max_length, mode) for m in a.micro for mode in ("fixed", "budget", "one-row", "shared")]
    print(markdown_table(["micro_batch_size", "layout", "token budget", "pairs / micro-batch", "waste", "slots / pair"],
                         [[r["micro"], r["mode"], r["budget"] or "-", r["pairs_per_micro"], f"{100 * r['waste']:.1f}%",
                           r["slots_per_pair"]] for r in out], text_columns=(1,)))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
