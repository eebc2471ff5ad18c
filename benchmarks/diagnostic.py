#!/usr/bin/env python3
"""The SimPO paper's diagnostic (arXiv 2405.14734, section 4), in miniature.

One synthetic preference task with a real signal and a length skew, one tiny model:
SFT on the chosen responses (``simpo-ray sft`` machinery), then SimPO and DPO each
from the same SFT export with the same steps, batch and data, and a small learning-rate
grid per method (the best lr by reward accuracy on a dev split). Reported on a separate
test split, for SFT, SimPO and DPO:

- likelihood-ranking accuracy: share of pairs with average per-token log-likelihood of
  chosen > rejected under the model (what greedy decoding follows);
- reward accuracy: each method's own reward ranks chosen above rejected (SimPO:
  beta x average log-prob; DPO: beta x (summed log-prob - reference's), the SFT model
  as reference);
- mean token length of greedy generations on test prompts, relative to the SFT model.

Every fit is a real Ray Train TorchTrainer with DeepSpeed ZeRO-3 workers
(``simpo_ray.train.train``), all on one local Ray cluster. Evaluation runs in this
process with transformers on the exported folders.

    python benchmarks/diagnostic.py                 # full run (7 min 46 s on 2 quiet cores)
    python benchmarks/diagnostic.py --smoke         # tiny budgets, one lr each (CI: ~2 min)

Data: the bundled generator's task families (``examples/data/make_preferences.py``):
chosen answers are correct and concise; rejected ones are wrong (same template), or
the correct answer padded with filler, or both; rejected texts are several times
longer on average. Train / dev / test splits are drawn with ``--seed`` and written to
``OUT/data/``; nothing large is committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("simpo", "dpo")
KINDS = ("wrong", "padded", "wrong_padded")

# Budgets. Full: what the README table was measured with. Smoke: seconds per fit, to
# show that every piece runs and is wired to the right weights (numbers meaningless).
FULL = dict(n_train=960, n_dev=128, n_test=256, n_gen=128, sft_steps=120, pref_steps=40,
            lrs={"simpo": [1e-4, 3e-4], "dpo": [1e-4, 3e-4]}, max_new_tokens=160)
SMOKE = dict(n_train=64, n_dev=16, n_test=16, n_gen=8, sft_steps=3, pref_steps=2,
             lrs={"simpo": [1e-3], "dpo": [1e-3]}, max_new_tokens=32)

SFT_LR = 3e-3
SIMPO_BETA, SIMPO_GAMMA_BETA_RATIO = 2.5, 0.5
DPO_BETA = 0.1


# ---------------------------------------------------------------- data
def _bundled_generator():
    path = REPO / "examples" / "data" / "make_preferences.py"
    spec = importlib.util.spec_from_file_location("make_preferences", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_task(seed: int, n_train: int, n_dev: int, n_test: int, out_dir: Path) -> dict:
    """Seeded train / dev / test JSONL (unique prompts across all three) and the kind of
    every dev and test pair. Returns {"files": {...}, "kinds": {split: [kind, ...]}, "stats"}."""
    gen = _bundled_generator()
    rows = gen.generate(seed, n_train + n_dev + n_test)  # shuffled, prompts unique
    splits = {"test": rows[:n_test], "dev": rows[n_test:n_test + n_dev], "train": rows[n_test + n_dev:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    files, kinds, stats = {}, {}, {}
    for name, part in splits.items():
        path = out_dir / f"{name}.jsonl"
        with open(path, "w") as f:
            for _, _, row in part:
                gen.check(row)
                f.write(json.dumps(row) + "\n")
        files[name] = str(path)
        kinds[name] = [k for _, k, _ in part]
        n = len(part)
        stats[name] = {"pairs": n, "mean_chars_chosen": round(sum(len(r["chosen"]) for *_, r in part) / n, 1),
                       "mean_chars_rejected": round(sum(len(r["rejected"]) for *_, r in part) / n, 1),
                       "kinds": {k: kinds[name].count(k) for k in KINDS}}
    return {"files": files, "kinds": kinds, "stats": stats}


def read_rows(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- training (Ray Train + DeepSpeed)
def base_config(b: dict, files: dict, root: Path, tiny: dict) -> dict:
    micro, total = (8, 16) if not b.get("smoke") else (4, 8)
    return {
        "model": {"name_or_path": "tiny", "tiny": tiny, "dtype": "float32"},
        "data": {"train_files": files["train"], "eval_files": files["dev"],
                 "max_length": 512, "max_prompt_length": 256},
        "simpo": {"beta": SIMPO_BETA, "gamma_beta_ratio": SIMPO_GAMMA_BETA_RATIO},
        "optim": {"lr": SFT_LR, "warmup_ratio": 0.1},
        "train": {"num_workers": 2, "cpus_per_worker": 1, "total_batch_size": total,
                  "micro_batch_size": micro, "epochs": 50,
                  # smoke: a report per step (tests read step 1, before any update)
                  "log_every": 1 if b.get("smoke") else 10},
        "output": {"root": str(root), "keep_checkpoints": 1},
        "ray": {"num_cpus": 4},
    }


def config(base: dict, name: str, steps: int, **sections):
    """The base config with ``sections`` merged in, run ``name``, ``steps`` optimizer steps."""
    from simpo_ray.config import RunConfig

    d = json.loads(json.dumps(base))
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    d["output"]["name"] = name
    d["train"].update(max_steps=steps, eval_every=steps, checkpoint_every=steps)
    d.setdefault("eval", {})["generate_every"] = 0  # generations are scored after training, below
    return RunConfig.from_dict(d)


def fit(cfg, prepared=None) -> dict:
    """One training run from scratch on the shared Ray cluster (an old folder of the same
    name is removed first: training would otherwise resume it).

    ``prepared`` None: ``simpo_ray.train.train`` end to end, as ``simpo-ray sft/train``
    runs it. Otherwise ``simpo_ray.train.fit`` on the data ``simpo_ray.train.prepare``
    made once (tokenized pairs, plus reference log-probs for DPO), as the sweep does for
    its trials: the same workers, without re-reading and re-tokenizing the data for every lr."""
    from simpo_ray.metrics import read_reports
    from simpo_ray.train import fit as train_fit
    from simpo_ray.train import train

    run_dir = cfg.output.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    _, summary = train(cfg) if prepared is None else train_fit(cfg, prepared)
    if not summary["finished"]:
        raise RuntimeError(f"run {cfg.output.name} did not finish: {summary}")
    reports = read_reports(run_dir / "metrics.jsonl")
    fit_s = round(time.time() - t0, 1)
    print(f"[diagnostic] {cfg.output.name}: {cfg.train.max_steps} steps in {fit_s:.0f} s", flush=True)
    return {"summary": summary, "reports": reports, "export": summary["export_dir"], "fit_s": fit_s}


# ---------------------------------------------------------------- evaluation (in-process)
class Scorer:
    """Summed and averaged completion log-probs of pairs under an exported model, with
    the trainer's own tokenization (``simpo_ray.rows.process_row``), collation and
    log-prob head (``simpo_ray.policy.PolicyLogps``)."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from simpo_ray.policy import PolicyLogps

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        self.model = PolicyLogps(lm).eval().requires_grad_(False)
        self.lm = lm

    def logps(self, rows: list, batch: int = 16) -> dict:
        """-> {"sum_c", "sum_r", "n_c", "n_r"}: lists over pairs (summed log-probs, tokens)."""
        import torch

        from simpo_ray.collate import collate_pairs
        from simpo_ray.rows import process_row

        trips = [process_row(self.tok, r, max_length=512, max_prompt_length=256)[1] for r in rows]
        out = {"sum_c": [], "sum_r": [], "n_c": [], "n_r": []}
        with torch.no_grad():
            for i in range(0, len(trips), batch):
                part = trips[i:i + batch]
                b = collate_pairs([t["prompt_ids"] for t in part], [t["chosen_ids"] for t in part],
                                  [t["rejected_ids"] for t in part], self.tok.pad_token_id, 8)
                sums, counts = self.model(b["input_ids"], b["attention_mask"], b["labels"])
                n = len(part)
                out["sum_c"] += sums[:n].tolist()
                out["sum_r"] += sums[n:].tolist()
                out["n_c"] += counts[:n].tolist()
                out["n_r"] += counts[n:].tolist()
        return out

    def greedy(self, prompts: list, max_new_tokens: int, batch: int = 64) -> list:
        """Greedy completions (token ids up to, not including, the end-of-turn token);
        ``None`` marks one that hit ``max_new_tokens`` without ending."""
        import torch

        tok, eos = self.tok, self.tok.eos_token_id
        out = []
        for i in range(0, len(prompts), batch):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts[i:i + batch]]
            enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(enc):  # left padding: generation continues every row at the end
                ids[j, width - len(e):] = torch.tensor(e)
                mask[j, width - len(e):] = 1
            with torch.no_grad():
                gen = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
            for row in gen[:, width:].tolist():
                out.append(row[:row.index(eos)] if eos in row else None if len(row) >= max_new_tokens
                           else row)
        return out


def pair_metrics(lp: dict, kinds: list, method: str | None, ref: dict | None) -> dict:
    """Likelihood-ranking and reward accuracy over pairs, overall and per rejection kind.

    method None (the SFT model): no reward of its own; reward accuracy is left out.
    Ties count as not ranked correctly (strict >, as the trainer's metrics)."""
    n = len(lp["sum_c"])
    avg_c = [s / c for s, c in zip(lp["sum_c"], lp["n_c"])]
    avg_r = [s / c for s, c in zip(lp["sum_r"], lp["n_r"])]
    like = [ac > ar for ac, ar in zip(avg_c, avg_r)]
    if method == "simpo":
        rew = [SIMPO_BETA * ac > SIMPO_BETA * ar for ac, ar in zip(avg_c, avg_r)]
    elif method == "dpo":
        rew = [DPO_BETA * ((sc - rc) - (sr - rr)) > 0 for sc, sr, rc, rr in
               zip(lp["sum_c"], lp["sum_r"], ref["sum_c"], ref["sum_r"])]
    else:
        rew = None
    out = {"pairs": n, "likelihood_accuracy": sum(like) / n,
           "mean_avg_logp_chosen": sum(avg_c) / n, "mean_avg_logp_rejected": sum(avg_r) / n,
           "likelihood_accuracy_by_kind": {k: _share(like, kinds, k) for k in KINDS}}
    if rew is not None:
        out["reward_accuracy"] = sum(rew) / n
        out["reward_accuracy_by_kind"] = {k: _share(rew, kinds, k) for k in KINDS}
    return out


def _share(flags: list, kinds: list, kind: str):
    sel = [f for f, k in zip(flags, kinds) if k == kind]
    return sum(sel) / len(sel) if sel else None


def generation_metrics(scorer: Scorer, rows: list, max_new_tokens: int) -> dict:
    """Mean greedy length in tokens (a completion that never ends counts as
    ``max_new_tokens``), share that never ended, share exactly equal to the chosen answer."""
    gens = scorer.greedy([r["prompt"] for r in rows], max_new_tokens)
    lengths = [max_new_tokens if g is None else len(g) for g in gens]
    texts = ["" if g is None else scorer.tok.decode(g) for g in gens]
    n = len(rows)
    return {"prompts": n, "mean_length": sum(lengths) / n,
            "unfinished": sum(g is None for g in gens) / n,
            "exact_correct": sum(t.strip() == r["chosen"] for t, r in zip(texts, rows)) / n,
            "examples": [{"prompt": r["prompt"], "generation": t} for r, t in zip(rows[:3], texts[:3])]}


# ---------------------------------------------------------------- the benchmark
def run(args) -> dict:
    import torch

    from simpo_ray.config import RunConfig
    from simpo_ray.train import init_ray

    b = dict(SMOKE if args.smoke else FULL, smoke=args.smoke)
    out = Path(args.out).resolve()
    tiny = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
            "intermediate_size": 4 * args.hidden, "seed": args.seed}
    started = time.time()
    task = make_task(args.seed, b["n_train"], b["n_dev"], b["n_test"], out / "data")
    dev, test = read_rows(task["files"]["dev"]), read_rows(task["files"]["test"])
    base = base_config(b, task["files"], out / "runs", tiny)
    init_ray(RunConfig.from_dict(base))  # one local cluster for every fit below

    sft_cfg = config(base, "sft", b["sft_steps"], simpo={"loss": "sft"}, optim={"lr": SFT_LR})
    fits = {"sft": fit(sft_cfg)}  # simpo-ray sft, end to end
    sft_dir = fits["sft"]["export"]
    # The preference runs share one tokenized copy of the data (and DPO one reference pass).
    from simpo_ray.train import prepare, with_reference

    prepared = {"simpo": prepare(config(base, "prepare", b["pref_steps"], model={"name_or_path": sft_dir}))}
    assert prepared["simpo"].plan.pad_id == 0
    grid = []
    for method in METHODS:
        for lr in b["lrs"][method]:
            name = f"{method}-lr{lr:g}"
            cfg = config(base, name, b["pref_steps"], model={"name_or_path": sft_dir},
                         simpo={"loss": method, "beta": SIMPO_BETA if method == "simpo" else DPO_BETA},
                         optim={"lr": lr})
            if method not in prepared:
                prepared[method] = with_reference(prepared["simpo"], cfg)
            fits[name] = fit(cfg, prepared[method])
            grid.append((method, lr, name))
    train_s = time.time() - started

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ev = time.time()
    from simpo_ray.models import resolve_model_path

    base_dir = resolve_model_path("tiny", dataclasses.asdict(sft_cfg.model.tiny))
    base_dev = Scorer(base_dir).logps(dev)
    sft = Scorer(sft_dir)
    ref = {"dev": sft.logps(dev), "test": sft.logps(test)}
    gen_rows = test[:b["n_gen"]]
    results = {"sft": {"dev": pair_metrics(ref["dev"], task["kinds"]["dev"], None, None),
                       "test": pair_metrics(ref["test"], task["kinds"]["test"], None, None),
                       "generation": generation_metrics(sft, gen_rows, b["max_new_tokens"])}}
    sft_len = results["sft"]["generation"]["mean_length"]
    sft_dev_logp = _mean_avg(ref["dev"], "c")
    table = []
    for method, lr, name in grid:
        s = Scorer(fits[name]["export"])
        lp_dev = s.logps(dev)
        r = {"method": method, "lr": lr, "run": name,
             "dev": pair_metrics(lp_dev, task["kinds"]["dev"], method, ref["dev"]),
             "trainer_final_dev": {k: v for k, v in fits[name]["summary"]["final_metrics"].items()
                                   if k.startswith("eval/")},
             "start": start_check(fits[name], sft_dev_logp, _mean_avg(base_dev, "c"), sft_dir, method)}
        table.append(r)
        results[name] = r
    best = {}
    for method in METHODS:
        # Highest dev reward accuracy; a tie goes to the smaller lr (closer to SFT).
        cands = sorted((r for r in table if r["method"] == method), key=lambda r: (-r["dev"]["reward_accuracy"], r["lr"]))
        best[method] = cands[0]
        s = Scorer(fits[cands[0]["run"]]["export"])
        cands[0]["test"] = pair_metrics(s.logps(test), task["kinds"]["test"], method, ref["test"])
        g = generation_metrics(s, gen_rows, b["max_new_tokens"])
        g["length_vs_sft"] = g["mean_length"] / sft_len - 1.0
        cands[0]["generation"] = g
    eval_s = time.time() - ev

    summary = {
        "command": "python benchmarks/diagnostic.py" + (" --smoke" if args.smoke else "")
                   + ("" if args.seed == 0 else f" --seed {args.seed}"),
        "seed": args.seed, "smoke": args.smoke, "budgets": {k: v for k, v in b.items() if k != "smoke"},
        "model": tiny, "data": task["stats"], "files": task["files"],
        "settings": {"sft_lr": SFT_LR, "simpo_beta": SIMPO_BETA, "simpo_gamma_beta_ratio": SIMPO_GAMMA_BETA_RATIO,
                     "dpo_beta": DPO_BETA, "total_batch_size": base["train"]["total_batch_size"],
                     "num_workers": base["train"]["num_workers"], "deepspeed_stage": 3},
        "sft": {**results["sft"], "export": sft_dir, "fit_s": fits["sft"]["fit_s"]},
        "grid": [{k: r[k] for k in ("method", "lr", "run", "dev", "trainer_final_dev", "start")}
                 | {"fit_s": fits[r["run"]]["fit_s"]} for r in table],
        "best": {m: {k: best[m][k] for k in ("lr", "run", "dev", "test", "generation", "start")}
                 | {"export": fits[best[m]["run"]]["export"]} for m in METHODS},
        "wall_s": {"training": round(train_s, 1), "evaluation": round(eval_s, 1),
                   "total": round(time.time() - started, 1)},
    }
    (out / "diagnostic.json").write_text(json.dumps(summary, indent=1))
    plot(summary, Path(args.plot) if args.plot else out / "diagnostic.png")
    summary["plot"] = str(Path(args.plot) if args.plot else out / "diagnostic.png")
    (out / "diagnostic.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    print(f"[diagnostic] wrote {out / 'diagnostic.json'} and {summary['plot']} in {summary['wall_s']['total']:.0f} s")
    return summary


def _mean_avg(lp: dict, side: str) -> float:
    vals = [s / n for s, n in zip(lp[f"sum_{side}"], lp[f"n_{side}"])]
    return sum(vals) / len(vals)


def start_check(f: dict, sft_dev_logp: float, base_dev_logp: float, sft_dir: str, method: str) -> dict:
    """Did the run start from the SFT weights? Its step-0 held-out report (the workers'
    forward before any update) against the same dev pairs scored here under the SFT
    export and under the untrained tiny model; and the model it was configured from."""
    step0 = next(m for m in f["reports"] if m["step"] == 0)
    import yaml

    cfg = yaml.safe_load((Path(f["summary"]["run_dir"]) / "config.yaml").read_text())
    return {"model_name_or_path": cfg["model"]["name_or_path"], "sft_export": sft_dir,
            "step0_dev_logp_chosen": step0["eval/logps/chosen"], "sft_dev_logp_chosen": sft_dev_logp,
            "untrained_dev_logp_chosen": base_dev_logp,
            "step0_dev_reward_margin": step0["eval/rewards/margins"],
            "matches_sft": abs(step0["eval/logps/chosen"] - sft_dev_logp) < 1e-3,
            "dpo_margin_zero_at_start": (abs(step0["eval/rewards/margins"]) < 1e-6) if method == "dpo" else None}


def markdown(s: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| model | lr | likelihood-ranking acc | reward acc | greedy length (tokens) | vs SFT | exact answers | unfinished |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    g = s["sft"]["generation"]
    lines.append(f"| SFT | {s['settings']['sft_lr']:g} | {pct(s['sft']['test']['likelihood_accuracy'])} | - | "
                 f"{g['mean_length']:.1f} | - | {pct(g['exact_correct'])} | {pct(g['unfinished'])} |")
    for m in METHODS:
        r = s["best"][m]
        g = r["generation"]
        lines.append(f"| {m.upper() if m == 'dpo' else 'SimPO'} | {r['lr']:g} | {pct(r['test']['likelihood_accuracy'])} | "
                     f"{pct(r['test']['reward_accuracy'])} | {g['mean_length']:.1f} | {100 * g['length_vs_sft']:+.1f}% | "
                     f"{pct(g['exact_correct'])} | {pct(g['unfinished'])} |")
    lines += ["", "Learning-rate grid (dev split):", "",
              "| method | lr | dev reward acc | dev likelihood-ranking acc | chosen avg logp | rejected avg logp |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in s["grid"]:
        d = r["dev"]
        lines.append(f"| {r['method']} | {r['lr']:g} | {pct(d['reward_accuracy'])} | {pct(d['likelihood_accuracy'])} | "
                     f"{d['mean_avg_logp_chosen']:.3f} | {d['mean_avg_logp_rejected']:.3f} |")
    lines += ["", "Likelihood-ranking accuracy by rejection kind (test):", "",
              "| model | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for name, t in [("SFT", s["sft"]["test"])] + [(m, s["best"][m]["test"]) for m in METHODS]:
        lines.append(f"| {name} | " + " | ".join(pct(t["likelihood_accuracy_by_kind"][k]) for k in KINDS) + " |")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["SFT", "SimPO", "DPO"]
    like = [s["sft"]["test"]["likelihood_accuracy"]] + [s["best"][m]["test"]["likelihood_accuracy"] for m in METHODS]
    rew = [math.nan] + [s["best"][m]["test"]["reward_accuracy"] for m in METHODS]
    length = [0.0] + [100 * s["best"][m]["generation"]["length_vs_sft"] for m in METHODS]
    colors = ["#888888", "#1f77b4", "#d62728"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, vals, title in ((axes[0], like, "likelihood-ranking accuracy (test)"),
                            (axes[1], rew, "reward accuracy (test, own reward)")):
        ax.bar(names, [0 if math.isnan(v) else v for v in vals], color=colors)
        for i, v in enumerate(vals):
            ax.text(i, (0 if math.isnan(v) else v) + 0.02, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center")
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=10)
    axes[2].bar(names, length, color=colors)
    for i, v in enumerate(length):
        axes[2].text(i, v + (1 if v >= 0 else -4), f"{v:+.1f}%", ha="center")
    axes[2].axhline(0, color="k", lw=0.6)
    axes[2].set_title("greedy generation length vs SFT", fontsize=10)
    lo, hi = min(length + [-5]), max(length + [5])
    axes[2].set_ylim(lo * 1.3, hi * 1.3)
    fig.suptitle(f"SimPO vs DPO from one SFT model, tiny Llama {s['model']['hidden_size']}x{s['model']['num_layers']}, "
                 f"seed {s['seed']}" + (" (SMOKE: budgets too small to mean anything)" if s["smoke"] else ""),
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny budgets and one lr per method (checks wiring only)")
    ap.add_argument("--seed", type=int, default=0, help="data and model seed")
    ap.add_argument("--out", default=str(REPO / "runs" / "diagnostic"), help="work folder (data, runs, JSON)")
    ap.add_argument("--plot", help="PNG path (default: OUT/diagnostic.png)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
