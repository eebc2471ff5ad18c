"""simpo-ray's SimPO training step against TRL's (CPOTrainer, loss_type="simpo").

Both trainers get the same tiny Llama weights (built from a seed, fp32, SDPA), the
same preference rows (plain strings, UltraFeedback-like long-tailed lengths), the
same micro-batches of pairs in the same order (total batch = micro batch, no
accumulation), the same beta, margin (TRL's ``simpo_gamma`` is the absolute gamma =
beta x our gamma_beta_ratio), learning rate, gradient clipping and torch thread count.

Modes (one optimizer step per micro-batch each):
  trl          TRL's step as its Trainer runs it: DPODataCollatorWithPadding,
               ``training_step`` (concatenated chosen+rejected forward, full logits,
               ``get_batch_logps`` averaged, ``cpo_loss`` with cpo_alpha=0), gradient
               clipping, TRL's optimizer (adamw_torch_fused on CPU) and scheduler.
               Gradient checkpointing (on by default in CPOConfig) and bf16 (default
               on) are turned off so that both sides compute the same thing in fp32.
  ours-packed  the worker's step without Ray or DeepSpeed: ``worker.forward_batch``
               (collate with ``data.packing: true``, rows of <= 2 x max_length, the
               chunked log-prob head of ``PolicyLogps``, ``objective``), backward,
               gradient clipping, torch AdamW (the client optimizer ``engine.py``
               hands DeepSpeed).
  ours-padded  the same with ``data.packing: false`` (the padded path; packing is the default): padded
               rows, chunked head.

Reported per model size: non-pad tokens/s (prompt + completion tokens of chosen and
rejected; the same count for every mode), padding waste (pad slots / all slots of
the forward), peak RSS, all as ratios against trl. Timing: the modes are interleaved
batch by batch; forward + backward is the fastest of ``--repeats`` tries on the same
batch (other processes only ever add time), then clipping + the optimizer step are
timed once. The same is kept in process CPU time (1 torch thread: steadier than wall
time when other jobs share the cores), reported as a second ratio. The first batch is a warm-up, not timed: on it, before any optimizer
step, the losses and gradient norms of all modes must agree (same weights, same
rows). Peak RSS: each mode in a fresh subprocess (same imports: torch, transformers,
TRL, simpo_ray), warm-up step, then the kernel's high-water mark is reset
(``/proc/self/clear_refs``) and read after ``--rss-steps`` steps; glibc's mmap
threshold is fixed so that freed buffers return to the kernel.

    python benchmarks/peer.py              # the table in benchmarks/README.md
    python benchmarks/peer.py --smoke      # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("trl", "ours-packed", "ours-padded")
SIZES = {  # hidden, layers, heads, MLP
    "xs": (64, 2, 2, 256),
    "s": (128, 4, 4, 512),
    "m": (256, 4, 4, 1024),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz     "


# ---------------------------------------------------------------- data
def ultrafeedback_like_rows(n: int, seed: int, max_length: int = 512, max_prompt: int = 256,
                            scale: float = 0.25) -> list[dict]:
    """n preference rows of plain text whose token lengths follow UltraFeedback-binarized
    under a Llama-3 tokenizer (log-normal, prompt median ~150 tokens, chosen ~300,
    rejected ~260, long right tails), scaled by ``scale``.

    The tiny byte tokenizer has one token per ASCII character, so text lengths are
    token lengths. Rows are cut so that [BOS] + prompt <= max_prompt and the whole
    sequence + [EOS] <= max_length: neither trainer truncates anything, so both see
    the same tokens."""
    rng = random.Random(seed)

    def ln(median: float, sigma: float) -> int:
        return max(1, int(rng.lognormvariate(0, sigma) * median * scale))

    def text(k: int) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(k))

    rows = []
    for _ in range(n):
        p = min(ln(150, 0.9), max_prompt - 1)
        room = max_length - 1 - p - 1  # BOS, EOS
        rows.append({"prompt": text(p), "chosen": text(min(ln(300, 0.75), room)),
                     "rejected": text(min(ln(260, 0.85), room))})
    return rows


def triplets(rows: list[dict], tok) -> list[tuple[list, list, list]]:
    """Rows -> (prompt_ids, chosen_ids, rejected_ids): BOS once at the start of the
    prompt, EOS closing each completion (what TRL's tokenize_row adds to plain text)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [([tok.bos_token_id] + enc(r["prompt"]), enc(r["chosen"]) + [tok.eos_token_id],
             enc(r["rejected"]) + [tok.eos_token_id]) for r in rows]


def numpy_batch(trips):
    """The shape Ray Data hands the worker: object arrays of id arrays."""
    import numpy as np

    out = {}
    for j, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
        col = np.empty(len(trips), dtype=object)
        for i, t in enumerate(trips):
            col[i] = np.array(t[j], dtype=np.int64)
        out[name] = col
    return out


# ---------------------------------------------------------------- the two trainers
def model_spec(size: str) -> dict:
    from simpo_ray.config import TinyModelConfig

    h, n_layers, heads, mlp = SIZES[size]
    return dataclasses.asdict(TinyModelConfig(hidden_size=h, num_layers=n_layers, num_heads=heads,
                                              intermediate_size=mlp, max_position_embeddings=1024))


def base_model(size: str):
    from simpo_ray.tiny import build_model

    m = build_model(model_spec(size)).float()
    m.set_attn_implementation("sdpa")
    return m


def run_config(a, packing: bool, loss: str = "simpo", beta: float | None = None):
    from simpo_ray.config import RunConfig

    return RunConfig.from_dict({
        "model": {"dtype": "float32", "attn_implementation": "sdpa", "logps_chunk_size": 1024},
        "data": {"train_files": ["<in-memory>"], "packing": packing, "max_length": a.max_length,
                 "max_prompt_length": a.max_length // 2},
        "simpo": {"loss": loss, "beta": a.beta if beta is None else beta, "gamma_beta_ratio": a.gamma_beta_ratio},
        "optim": {"lr": a.lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
    })


class Ours:
    """The worker's per-micro-batch work, on a plain PolicyLogps instead of a DeepSpeed engine."""

    def __init__(self, lm, cfg, pad_id: int):
        import torch

        from simpo_ray.policy import PolicyLogps

        self.policy = PolicyLogps(lm, chunk_size=cfg.model.logps_chunk_size)
        self.policy.device = torch.device("cpu")  # forward_batch moves tensors to engine.device
        self.cfg, self.pad_id = cfg, pad_id
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, weight_decay=0.0)

    def forward_backward(self, batch) -> float:
        from simpo_ray.worker import forward_batch

        self.opt.zero_grad(set_to_none=True)
        loss, _, _ = forward_batch(self.policy, batch, self.cfg, self.pad_id)
        loss.backward()
        return loss.item()

    def optimizer_step(self) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def slots(self, batch) -> tuple[int, int]:
        from simpo_ray.collate import padding_stats
        from simpo_ray.worker import collate

        s = padding_stats(collate(batch, self.cfg, self.pad_id)[0])
        return s["tokens"], s["slots"]


class Trl:
    """TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0), stepped the way its Trainer's
    inner loop steps it: collate, training_step, clip, optimizer.step, scheduler.step."""

    def __init__(self, lm, tok, rows, a, out_dir: str):
        from datasets import Dataset
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            output_dir=out_dir, loss_type="simpo", cpo_alpha=0.0, beta=a.beta,
            simpo_gamma=a.beta * a.gamma_beta_ratio, learning_rate=a.lr, weight_decay=0.0,
            max_grad_norm=1.0, lr_scheduler_type="constant", max_length=a.max_length,
            per_device_train_batch_size=a.micro, gradient_accumulation_steps=1,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            report_to="none", save_strategy="no", logging_steps=10**9, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, seed=0)
        self.tr = CPOTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        self.tr.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.tr.current_gradient_accumulation_steps = 1  # what the inner loop sets for one micro-batch per step

    def features(self, idx):
        return [self.tr.train_dataset[i] for i in idx]

    def forward_backward(self, feats) -> float:
        self.tr.model.zero_grad(set_to_none=True)
        inputs = self.tr.data_collator(feats)
        return float(self.tr.training_step(self.tr.model, inputs))

    def optimizer_step(self) -> float:
        norm = self.tr._clip_grad_norm(self.tr.model)
        self.tr.optimizer.step()
        self.tr.lr_scheduler.step()
        self.tr.model.zero_grad()
        return float(norm)

    def slots(self, feats) -> tuple[int, int]:
        from trl.experimental.cpo import CPOTrainer

        c = CPOTrainer.concatenated_inputs(self.tr.data_collator(feats), padding_value=self.tr.pad_token_id)
        mask = c["concatenated_attention_mask"]
        return int(mask.sum()), mask.numel()


def check_same_tokens(trl: Trl, trips) -> None:
    """TRL's tokenized rows must be exactly our triplets (prompt + completion, labels)."""
    for i, (p, c, r) in enumerate(trips):
        row = trl.tr.train_dataset[i]
        for side, comp in (("chosen", c), ("rejected", r)):
            if row[f"{side}_input_ids"] != p + comp or row[f"{side}_labels"] != [-100] * len(p) + comp:
                raise AssertionError(f"row {i}: TRL tokenized {side} differently from our triplet")


def build(mode: str, size: str, a, rows, trips, tok, tmp: str):
    import torch

    torch.manual_seed(0)
    lm = base_model(size)
    if mode == "trl":
        t = Trl(lm, tok, rows, a, os.path.join(tmp, f"trl-{size}"))
        check_same_tokens(t, trips)
        return t
    return Ours(lm, run_config(a, packing=mode == "ours-packed"), tok.pad_token_id)


def inputs_for(mode: str, runner, idx, trips):
    return runner.features(idx) if mode == "trl" else numpy_batch([trips[i] for i in idx])


# ---------------------------------------------------------------- measurements
def throughput(size: str, a, rows, trips, tok, tmp: str) -> dict:
    import torch

    runners = {m: build(m, size, a, rows, trips, tok, tmp) for m in MODES}
    work = [list(range(i, i + a.micro)) for i in range(0, (a.batches + 1) * a.micro, a.micro)]
    secs, cpu, toks = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0)
    real, slots = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0)
    first_loss, first_norm = {}, {}
    for i, idx in enumerate(work):
        n_tokens = sum(2 * len(trips[k][0]) + len(trips[k][1]) + len(trips[k][2]) for k in idx)
        for mode in MODES:
            r = runners[mode]
            inp = inputs_for(mode, r, idx, trips)
            best = best_cpu = math.inf
            for _ in range(a.repeats if i else 1):
                t0, c0 = time.perf_counter(), time.process_time()
                loss = r.forward_backward(inp)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            norm = r.optimizer_step()
            opt_s, opt_cpu = time.perf_counter() - t0, time.process_time() - c0
            if i == 0:  # warm-up: checked, not timed
                first_loss[mode], first_norm[mode] = loss, norm
                continue
            secs[mode] += best + opt_s
            cpu[mode] += best_cpu + opt_cpu
            toks[mode] += n_tokens
            rt, st = r.slots(inp)
            real[mode] += rt
            slots[mode] += st
            if real[mode] != toks[mode]:
                raise AssertionError(f"{mode}: {real[mode]} real tokens in the forward, expected {toks[mode]}")
    assert torch.get_num_threads() == a.threads, "a library changed the torch thread count"
    loss_diff = max(abs(first_loss[m] - first_loss["trl"]) for m in MODES)
    norm_rel = max(abs(first_norm[m] - first_norm["trl"]) / first_norm["trl"] for m in MODES)
    return {"tokens_per_s": {m: toks[m] / secs[m] for m in MODES},
            "tokens_per_cpu_s": {m: toks[m] / cpu[m] for m in MODES},
            "waste": {m: 1 - real[m] / slots[m] for m in MODES},
            "first_loss": first_loss, "first_loss_max_abs_diff": loss_diff,
            "first_grad_norm": first_norm, "first_grad_norm_max_rel_diff": norm_rel,
            "timed_batches": len(work) - 1, "tokens_per_batch": toks["trl"] / (len(work) - 1)}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def rss_child(mode: str, size: str, a) -> dict:
    """In a fresh process: set up one mode, warm up, reset VmHWM, run steps, read it."""
    import torch
    import transformers  # noqa: F401  same imports in every mode
    import trl.experimental.cpo  # noqa: F401

    import simpo_ray.worker  # noqa: F401
    from simpo_ray.tiny import build_tokenizer

    torch.set_num_threads(a.threads)
    tok = build_tokenizer()
    rows = ultrafeedback_like_rows(a.pairs, 0, a.max_length, a.max_length // 2)
    trips = triplets(rows, tok)
    imports_kib = rss_kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        r = build(mode, size, a, rows, trips, tok, tmp)
        work = [list(range(i, i + a.micro)) for i in range(0, (a.rss_steps + 1) * a.micro, a.micro)]
        for i, idx in enumerate(work):
            r.forward_backward(inputs_for(mode, r, idx, trips))
            r.optimizer_step()
            if i == 0:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the high-water mark to the current RSS
                setup_kib = rss_kib("VmRSS")
        peak_kib = rss_kib("VmHWM")
    return {"peak_mib": peak_kib / 1024, "above_setup_mib": (peak_kib - setup_kib) / 1024,
            "setup_mib": setup_kib / 1024, "imports_mib": imports_kib / 1024}


def peak_rss(mode: str, size: str, argv: list) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--rss-child", mode, "--size", size],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"RSS subprocess for {mode}/{size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["xs", "s"], choices=list(SIZES))
    ap.add_argument("--pairs", type=int, default=256, help="rows generated (the batches take the first ones)")
    ap.add_argument("--micro", type=int, default=8, help="pairs per micro-batch = per optimizer step")
    ap.add_argument("--batches", type=int, default=12, help="timed micro-batches per mode and size")
    ap.add_argument("--repeats", type=int, default=3, help="forward+backward tries per batch (the fastest counts)")
    ap.add_argument("--rss-steps", type=int, default=4, help="steps after warm-up in each RSS subprocess")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--beta", type=float, default=2.5)
    ap.add_argument("--gamma-beta-ratio", type=float, default=0.55)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both trainers")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="first-batch |loss difference| allowed")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--rss-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.pairs, a.micro, a.batches, a.repeats, a.rss_steps, a.max_length = ["xs"], 16, 2, 2, 1, 1, 128
    return a


def child_argv(a) -> list:
    """The settings a subprocess needs (smoke already applied, so pass them explicitly)."""
    return ["--pairs", str(a.pairs), "--micro", str(a.micro), "--rss-steps", str(a.rss_steps),
            "--max-length", str(a.max_length), "--beta", str(a.beta), "--gamma-beta-ratio", str(a.gamma_beta_ratio),
            "--lr", str(a.lr), "--threads", str(a.threads)]


def main(argv=None) -> dict:
    a = parse(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.rss_child:
        print(json.dumps(rss_child(a.rss_child, a.size, a)))
        return {}
    from simpo_ray.tiny import build_tokenizer

    tok = build_tokenizer()
    rows = ultrafeedback_like_rows(a.pairs, 0, a.max_length, a.max_length // 2)
    trips = triplets(rows, tok)
    used = trips[: (a.batches + 1) * a.micro]
    resp = sorted(len(t[j]) for t in used for j in (1, 2))
    print(f"load average at start: {loadavg()}; torch {torch.__version__}, {a.threads} thread(s)")
    print(f"{len(used)} pairs used ({a.micro} per step, 1 warm-up + {a.batches} timed steps); response tokens "
          f"p50 {resp[len(resp) // 2]} p90 {resp[int(len(resp) * 0.9)]} max {resp[-1]}; max_length {a.max_length}")
    results = {"args": vars(a), "loadavg_start": loadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            t = throughput(size, a, rows, trips, tok, tmp)
            mem = {m: peak_rss(m, size, child_argv(a)) for m in MODES}
            results["sizes"][size] = {**t, "rss": mem}
            if t["first_loss_max_abs_diff"] > a.tolerance:
                raise AssertionError(f"{size}: first-batch losses differ by {t['first_loss_max_abs_diff']:.2e} "
                                     f"> {a.tolerance}: {t['first_loss']}")
            print(f"\n{size} {SIZES[size]}: first-batch loss {t['first_loss']['trl']:.6f}, modes agree to "
                  f"{t['first_loss_max_abs_diff']:.1e} (grad norm to {t['first_grad_norm_max_rel_diff']:.1e} "
                  f"relative); {t['timed_batches']} timed steps of {t['tokens_per_batch']:.0f} non-pad tokens; "
                  f"load {loadavg()}")
            print("| mode | non-pad tokens/s | ratio vs trl | CPU-time ratio vs trl | padding waste | peak RSS MiB "
                  "| ratio vs trl | RSS above setup MiB | ratio vs trl |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for m in MODES:
                tps, w, r = t["tokens_per_s"][m], t["waste"][m], mem[m]
                cps = t["tokens_per_cpu_s"][m] / t["tokens_per_cpu_s"]["trl"]
                print(f"| {m} | {tps:.0f} | {tps / t['tokens_per_s']['trl']:.2f} | {cps:.2f} | {w:.1%} | {r['peak_mib']:.0f} | "
                      f"{r['peak_mib'] / mem['trl']['peak_mib']:.2f} | {r['above_setup_mib']:.0f} | "
                      f"{r['above_setup_mib'] / mem['trl']['above_setup_mib']:.2f} |")
    return finish(results, a.json)


def finish(results: dict, json_path) -> dict:
    """The load at the end, printed and kept; the results written as JSON when asked."""
    results["loadavg_end"] = loadavg()
    print(f"\nload average at end: {results['loadavg_end']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
