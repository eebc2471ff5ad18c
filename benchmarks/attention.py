"""Attention per segment and the shared prompt on CPU: forward + backward time of one
micro-batch of pairs, four layouts, at max_length T = 256, 512, 1024, 2048.

Modes (the same pairs for all four at each T):
  padded          collate_pairs, SDPA with the padding mask; the baseline.
  packed-dense    collate_packed(max_tokens=2T), attention_mask=None + restarting
                  position_ids: transformers builds the dense (R, 1, L, L)
                  block-diagonal mask for SDPA (data.packing today).
  packed-segments the same rows through attention.use_segment_attention: one SDPA call
                  per sequence, no dense mask.
  shared-segments segments.collate_shared(max_tokens=2T): the prompt once per pair
                  (p + c + 1 + r tokens, not 2p + c + r), segment attention.

Data: benchmarks/packing.py's UltraFeedback-like length mix (log-normal, long tails:
prompt median ~150, responses ~300 at T = 2048), its lengths scaled by T / 2048 and
truncated at T (prompt at T / 2), so the prompt's share of a pair stays the same at
every T. Each micro-batch takes whole pairs until it holds --tokens real tokens
(2p + c + r per pair, the unshared count): the same real tokens per batch at every T.
Model: a Llama of hidden 256, 4 layers, 4 heads, vocab 32000, float32, through
policy.PolicyLogps with the chunked head (chunk 1024), the SimPO loss of
objective.step_loss; no optimizer step. Time: per batch the fastest of --repeats tries
(load from other processes only adds), the modes interleaved batch by batch; a
warm-up batch per T is checked (the four losses must agree to 1e-5) and not timed.
Ratio = padded seconds / mode seconds, measured in the same run (> 1: faster).

    python benchmarks/attention.py --out runs/bench-attention.json   # the README table
    python benchmarks/attention.py --quick                           # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from packing import ultrafeedback_like  # noqa: E402  (benchmarks/packing.py: the length mix)

MODES = ("padded", "packed-dense", "packed-segments", "shared-segments")


def build_policy(vocab: int, hidden: int, layers: int, chunk_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_ray.policy import PolicyLogps

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    lm = LlamaForCausalLM(cfg).float().train()
    lm.set_attn_implementation("sdpa")
    return PolicyLogps(lm, chunk_size=chunk_size)


def micro_batches(pairs, tokens: int, n: int) -> list[dict]:
    """n batches of whole pairs, each closed once it holds ``tokens`` real tokens."""
    out, cur, used = [], [], 0
    for p, c, r in pairs:
        cur.append((p, c, r))
        used += 2 * len(p) + len(c) + len(r)
        if used >= tokens:
            out.append({"prompt_ids": [x[0] for x in cur], "chosen_ids": [x[1] for x in cur],
                        "rejected_ids": [x[2] for x in cur]})
            cur, used = [], 0
            if len(out) == n:
                break
    return out


def inputs(mode: str, batch: dict, T: int):
    """(tensors, extra forward kwargs, slots) of one mode."""
    from simpo_ray.collate import collate_numpy_batch, packed_model_inputs

    if mode == "padded":
        b = collate_numpy_batch(batch, 0, pad_to_multiple_of=8)
        return b, {}, b["input_ids"].numel()
    b, extra = packed_model_inputs(batch, 0, 2 * T, flash=False, share_prompt=mode == "shared-segments",
                                   segment_attention=mode.endswith("segments"))
    return b, extra, b["input_ids"].numel()


def step(policy, mode: str, b: dict, extra: dict):
    from simpo_ray.attention import use_segment_attention
    from simpo_ray.objective import step_loss
    from simpo_ray.sections import SimPOConfig

    if mode.endswith("segments"):
        use_segment_attention(policy)
    else:
        policy.lm.set_attn_implementation("sdpa")
    policy.zero_grad(set_to_none=True)
    sums, counts = policy(b["input_ids"], b.get("attention_mask"), b["labels"],
                          sequence_index=b.get("sequence_index"), **extra)
    loss = step_loss(SimPOConfig(beta=2.5, gamma_beta_ratio=0.5), sums, counts)[0]
    loss.backward()
    return float(loss.detach())


def run(a) -> dict:
    policy = build_policy(a.vocab, a.hidden, a.layers, a.chunk_size)
    results = []
    for T in a.lengths:
        pairs = ultrafeedback_like(4096, seed=T, max_length=T, max_prompt=T // 2, scale=T / 2048)
        work = micro_batches(pairs, a.tokens, a.batches + 1)
        secs, slots, first = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0), {}
        for i, batch in enumerate(work):
            for mode in MODES:
                b, extra, n_slots = inputs(mode, batch, T)
                dt = float("inf")
                for _ in range(a.repeats if i else 1):
                    t0 = time.perf_counter()
                    loss = step(policy, mode, b, extra)
                    dt = min(dt, time.perf_counter() - t0)
                if i == 0:
                    first[mode] = loss
                    continue
                secs[mode] += dt
                slots[mode] += n_slots
        diff = max(abs(first[m] - first["padded"]) for m in MODES)
        if diff > 1e-5:
            raise SystemExit(f"T={T}: the losses of the four layouts differ by {diff:.1e}")
        timed = work[1:]
        results.append({
            "max_length": T, "timed_batches": len(timed),
            "pairs_per_batch": sum(len(b["prompt_ids"]) for b in timed) / len(timed),
            "real_tokens_per_batch": sum(2 * len(p) + len(c) + len(r) for b in timed for p, c, r in
                                         zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"])) / len(timed),
            "prompt_share": sum(2 * len(p) for b in timed for p in b["prompt_ids"]) / sum(
                2 * len(p) + len(c) + len(r) for b in timed for p, c, r in
                zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"])),
            "seconds": {m: secs[m] / len(timed) for m in MODES},
            "slots": {m: slots[m] / len(timed) for m in MODES},
            "ratio_vs_padded": {m: secs["padded"] / secs[m] for m in MODES},
            "first_loss_max_diff": diff})
    return {"results": results, "args": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(out: dict) -> str:
    lines = ["| max_length | pairs / batch | prompt share | padded s | packed-dense s (x) | packed-segments s (x) "
             "| shared-segments s (x) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["results"]:
        s, x = r["seconds"], r["ratio_vs_padded"]
        cells = " | ".join(f"{s[m]:.3f} ({x[m]:.2f})" for m in MODES[1:])
        lines.append(f"| {r['max_length']} | {r['pairs_per_batch']:.1f} | {r['prompt_share']:.0%} | "
                     f"{s['padded']:.3f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="max_length T")
    ap.add_argument("--tokens", type=int, default=2048, help="real tokens per micro-batch (2p + c + r per pair)")
    ap.add_argument("--batches", type=int, default=2, help="timed micro-batches per T (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="tries per timed batch (the fastest counts)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunk-size", type=int, default=1024, help="the chunked head's chunk")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="a smoke run (seconds): T 128 and 256, small batches, "
                    "vocab 4096, 2 layers")
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths, a.tokens, a.batches, a.repeats, a.vocab, a.layers = [128, 256], 768, 1, 1, 4096, 2
    torch.set_num_threads(a.threads)
    out = run(a)
    print(f"forward + backward seconds per micro-batch (x = padded / mode), {a.tokens} real tokens per batch, "
          f"{a.batches} timed batches per T, torch {out['torch']}, {out['threads']} thread(s):\n")
    print(table(out))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
