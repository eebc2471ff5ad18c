"""``simpo-ray eval``: held-out pairs, greedy generations and reward-model wins for one
or more models against a baseline, and one report (``simpo_ray.eval_report``).

On the Ray cluster, with the training and on-policy machinery:

    pairs   the data layer reads and tokenizes ``--data`` as training does (chat template,
            BOS policy, truncation); per model one Ray Data actor pass (the reference
            pass, ``simpo_ray.reference``: the same ``PolicyLogps`` path as training)
            gives every pair's summed chosen / rejected log-probs
    replies the distinct prompts of ``--data`` (``simpo_ray.prompts``), greedy, from
            generator actors (vLLM, or transformers ``generate``), per model
    rewards one pool of reward-scorer actors scores every model's reply and the baseline's

Statistics (``simpo_ray.eval_stats``, pure): likelihood-ranking accuracy, each method's
own reward accuracy (the DPO family against the baseline as reference), by length
quartile and by ``category``; the probes' generation metrics; win rate against the
baseline (ties half) and a length-controlled win rate, with bootstrap intervals.

A model is a Hugging Face folder, or a run folder (its ``model/`` export is used, and
its metrics give peak memory and wall time); its method comes from the model card.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from simpo_ray.config import ConfigError, RunConfig

EVAL_DIR = "eval"  # default output: <output.root>/eval


@dataclass(frozen=True)
class Model:
    """One model to evaluate: its label, weights folder, method and run folder."""

    label: str
    path: str
    loss: Optional[str] = None
    run_dir: Optional[str] = None


def card_config(folder) -> Optional[dict]:
    """The resolved config a simpo-ray model card records (``export.model_card``), or None."""
    import yaml

    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    m = re.search(r"## Resolved config\s*```yaml\n(.*?)```", card.read_text(), flags=re.S)
    return yaml.safe_load(m.group(1)) if m else None


def resolve_model(arg: str, label: Optional[str] = None, tiny_spec: Optional[dict] = None) -> Model:
    """A command-line model: ``tiny``, a Hugging Face folder, or a run folder (its
    ``model/``). A folder that holds neither is a ConfigError naming it."""
    from simpo_ray.models import resolve_model_path

    if arg == "tiny":
        return Model(label or "tiny", resolve_model_path("tiny", tiny_spec or {}))
    p = Path(arg)
    run_dir = None
    if (p / "model" / "config.json").is_file():
        run_dir, p = p, p / "model"
    elif (p / "config.json").is_file() and (p.parent / "metrics.jsonl").is_file():
        run_dir = p.parent
    if not (p / "config.json").is_file():
        raise ConfigError("models", f"{arg} is neither a model folder (config.json) nor a run folder with model/")
    card = card_config(p) or {}
    loss = (card.get("simpo") or {}).get("loss")
    name = label or (run_dir.name if run_dir is not None else p.name)
    return Model(name, str(p), loss, str(run_dir) if run_dir is not None else None)


def eval_config(base: RunConfig, data, max_prompts: int, max_tokens: int, backend: Optional[str],
                reward_model: Optional[str]) -> RunConfig:
    """The config eval runs under: ``base``'s tokenization and engine settings, every
    row of ``data`` held out (no split); decoding is greedy (``_replies``)."""
    d = base.to_dict()
    files = list(data) if isinstance(data, (list, tuple)) else [data]
    d["data"].update(train_files=files, eval_files=None, eval_fraction=0.0, eval_stratify=False)
    g = d["generate"]
    g.update(prompt_files=files, max_prompts=max_prompts, max_tokens=max_tokens)
    if backend:
        g["backend"] = backend
    if reward_model:
        g["reward"]["name_or_path"] = reward_model
    return RunConfig.from_dict(d)


def _pair_records(ds, cfg: RunConfig, path: str, pad_id: int, categories: dict) -> dict:
    """(source, row) -> the pair's summed log-probs and lengths under the model at ``path``."""
    from simpo_ray.reference import add_reference_logps

    scored = add_reference_logps(ds, cfg, path, pad_id)
    out = {}
    cols = ["source", "row", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
    for b in scored.select_columns(cols).iter_batches(batch_size=1024, batch_format="numpy"):
        for s, r, c, j, cs, rs in zip(*(b[k] for k in cols)):
            key = (str(s), int(r))
            out[key] = {"chosen_sum": float(cs), "rejected_sum": float(rs), "chosen_tokens": len(c),
                        "rejected_tokens": len(j), "category": categories.get(key)}
    return out


def _categories(files: list) -> dict:
    """(file, row) -> the row's ``category`` where it has one (read on the driver)."""
    from simpo_ray.sources import iter_file_rows

    out = {}
    for f in files:
        for n, row in iter_file_rows(f):
            if isinstance(row, dict) and isinstance(row.get("category"), (str, int)):
                out[(f, n)] = str(row["category"])
    return out


def _replies(cfg: RunConfig, path: str, prompts: list, stop_ids: list) -> list:
    """Greedy replies of the model at ``path`` to ``prompts``, in prompt order, as
    ``probes.reply`` records (tokens, chars, finished, repeat, empty, text)."""
    import ray
    from transformers import AutoTokenizer

    from simpo_ray.generators import GeneratorSettings, start_generators, stop_actors
    from simpo_ray.probes import reply

    g = cfg.generate
    settings = dataclasses.replace(GeneratorSettings.from_config(cfg, stop_ids), num_samples=1, temperature=0.0)
    gens = start_generators(cfg, path, settings)
    try:
        batches = [prompts[i:i + g.batch_size] for i in range(0, len(prompts), g.batch_size)]
        futures = [gens[i % len(gens)].generate.remote(i, b, 0) for i, b in enumerate(batches)]
        results = {r["prompt_id"]: r["samples"][0] for out in ray.get(futures) for r in out["results"]}
    finally:
        stop_actors(gens)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else -1
    text_of = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [dict(reply(list(results[p["prompt_id"]]["token_ids"]), stop_ids, pad, text_of),
                 prompt_id=p["prompt_id"]) for p in prompts]


def _rewards(cfg: RunConfig, prompts: list, replies: dict) -> dict:
    """label -> the reward of each of that model's replies (prompt order), one scorer pool."""
    from ray.util.actor_pool import ActorPool

    from simpo_ray.generators import stop_actors
    from simpo_ray.reward import start_scorers

    scorers = start_scorers(cfg)
    try:
        pool, labels = ActorPool(scorers), list(replies)
        for i, label in enumerate(labels):
            items = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "samples": [{"sample": 0, "text": r["text"]}]}
                     for p, r in zip(prompts, replies[label])]
            pool.submit(lambda a, v: a.score.remote(v[1], index=v[0]), (i, items))
        out = {}
        while pool.has_next():
            scored = pool.get_next_unordered()
            out[labels[scored["index"]]] = [scored["scores"][p["prompt_id"]][0] for p in prompts]
    finally:
        stop_actors(scorers)
    return out


def _run_facts(run_dir: Optional[str]) -> dict:
    """Peak memory (max ``sys/rss_mb``) and wall time of the run that made a model."""
    from simpo_ray.metrics import read_all

    if not run_dir:
        return {"peak_rss_mb": None, "wall_s": None}
    lines = read_all(Path(run_dir) / "metrics.jsonl")
    rss = [m["sys/rss_mb"] for m in lines if isinstance(m.get("sys/rss_mb"), (int, float))]
    summary = Path(run_dir) / "summary.json"
    wall = json.loads(summary.read_text()).get("wall_s") if summary.is_file() else None
    return {"peak_rss_mb": max(rss) if rss else None, "wall_s": wall}


def evaluate(models: list, data: str, cfg: RunConfig, out_dir, baseline: Optional[Model] = None,
             reward_model: Optional[str] = None, extra: Optional[dict] = None) -> dict:
    """Evaluate ``models`` (``Model``) on ``data`` under ``cfg`` (``eval_config``, whose
    ``generate.reward`` is ``reward_model``), against ``baseline``; write the report to
    ``out_dir``. Win rates need both a baseline and a reward model. ``extra``: label ->
    facts to put in an entry (e.g. a compare run's wall time). Returns the report dict."""
    from simpo_ray import eval_stats as S
    from simpo_ray.data import DataError, prepare_datasets
    from simpo_ray.eval_report import format_summary, write_report
    from simpo_ray.generators import stop_token_ids
    from simpo_ray.probes import summarize
    from simpo_ray.prompts import read_prompts
    from simpo_ray.train import init_ray

    started = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    everyone = ([baseline] if baseline else []) + [m for m in models if not baseline or m.path != baseline.path]
    if len({m.label for m in everyone}) != len(everyone):
        raise ConfigError("models", "two models have the same label: " + ", ".join(m.label for m in everyone))
    tok_path = everyone[0].path
    _same_tokenizer(everyone, cfg.model.trust_remote_code)
    prepared = prepare_datasets(cfg, tok_path)
    ds, stats = prepared["train"], prepared["stats"]
    if not stats["train_pairs"]:
        raise DataError(f"{data}: no usable pair to evaluate")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    categories = _categories(stats.get("files") or cfg.data.train_files)
    prompts, prompt_stats = read_prompts(cfg, tok_path)
    stop_ids = stop_token_ids(cfg, tok_path)
    print(f"[simpo-ray] eval: {stats['train_pairs']} pairs, {len(prompts)} prompts (greedy, <= "
          f"{cfg.generate.max_tokens} tokens, {cfg.generate.backend}), {len(everyone)} model(s)"
          + (f", baseline {baseline.label}" if baseline else ""), flush=True)
    pairs, replies = {}, {}
    for m in everyone:
        t = time.time()
        pairs[m.label] = _pair_records(ds, cfg, m.path, pad_id, categories)
        replies[m.label] = _replies(cfg, m.path, prompts, stop_ids)
        print(f"[simpo-ray] eval: {m.label} scored and generated in {time.time() - t:.0f} s", flush=True)
    keys = sorted(pairs[everyone[0].label])
    base_pairs = pairs[baseline.label] if baseline else None
    rewards = _rewards(cfg, prompts, replies) if reward_model and baseline else {}
    entries = {}
    for m in everyone:
        records = []
        for k in keys:
            r = dict(pairs[m.label][k], ref_chosen_sum=None, ref_rejected_sum=None)
            if base_pairs is not None:
                r.update(ref_chosen_sum=base_pairs[k]["chosen_sum"], ref_rejected_sum=base_pairs[k]["rejected_sum"])
            records.append(r)
        gen = {k.split("/", 1)[1]: v for k, v in summarize(replies[m.label]).items()}
        win = win_lc = None
        if rewards and m is not baseline:
            mine, theirs = rewards[m.label], rewards[baseline.label]
            win = S.win_rate(mine, theirs, seed=cfg.data.seed)
            win_lc = S.length_controlled_win_rate(mine, theirs, [r["tokens"] for r in replies[m.label]],
                                                  [r["tokens"] for r in replies[baseline.label]], seed=cfg.data.seed)
        entries[m.label] = {"path": m.path, "loss": m.loss, "pairwise": S.pairwise(records, m.loss),
                            "generation": gen, "reply_lengths": [r["tokens"] for r in replies[m.label]],
                            "win": win, "win_lc": win_lc, **_run_facts(m.run_dir), **(extra or {}).get(m.label, {})}
    with open(out_dir / "generations.jsonl", "w") as f:
        for label, rs in replies.items():
            for i, r in enumerate(rs):
                f.write(json.dumps({"model": label, "prompt_id": r["prompt_id"], "tokens": r["tokens"],
                                    "finished": r["finished"], "text": r["text"],
                                    "reward": rewards[label][i] if label in rewards else None}) + "\n")
    report = {"data": ", ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data), "baseline": baseline.path if baseline else None,
              "reward_model": reward_model if rewards else None,
              "n_pairs": len(keys), "n_prompts": len(prompts), "prompts": prompt_stats.get("prompts_available"),
              "models": entries, "wall_s": round(time.time() - started, 1)}
    paths = write_report(out_dir, report)
    report = json.loads(Path(paths["json"]).read_text())
    print(format_summary(report), flush=True)
    for line in report.get("verdict", []):
        print(f"[simpo-ray] {line}", flush=True)
    print(f"[simpo-ray] report: {paths['md']}", flush=True)
    return report


def _same_tokenizer(models: list, trust: bool = False) -> None:
    """Pairs are tokenized once: every model must share the first one's tokenizer (its
    vocabulary, special tokens and chat template; a re-saved copy's files may differ)."""
    from transformers import AutoTokenizer

    def identity(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        return tok.get_vocab(), tok.all_special_ids, tok.chat_template

    first = identity(models[0].path)
    other = [m.label for m in models[1:] if identity(m.path) != first]
    if other:
        raise ConfigError("models", f"{', '.join(other)} use another tokenizer than {models[0].label}; "
                                    "evaluate models with different tokenizers separately")


def run_eval_cli(args) -> int:
    """``simpo-ray eval`` (parsed arguments): models, --data, --baseline, --reward-model, --out."""
    tiny = dataclasses.asdict(RunConfig().model.tiny)
    models = [resolve_model(a, tiny_spec=tiny) for a in args.models]
    baseline = resolve_model(args.baseline, label="baseline", tiny_spec=tiny) if args.baseline else None
    base = RunConfig.from_yaml(args.config, args.set or []) if args.config else _card_or_default(models[0])
    cfg = eval_config(base, args.data, args.prompts, args.max_tokens or base.eval.generate_max_tokens,
                      args.backend, args.reward_model)
    if args.address:
        cfg = RunConfig.from_dict({**cfg.to_dict(), "ray": {**cfg.to_dict()["ray"], "address": args.address}})
    out = args.out or str(Path(cfg.output.root) / EVAL_DIR)
    evaluate(models, args.data, cfg, out, baseline=baseline, reward_model=args.reward_model)
    return 0


def _card_or_default(model: Model) -> RunConfig:
    """The config a model was trained with (its card), else the defaults."""
    card = card_config(model.path)
    return RunConfig.from_dict(card) if card else RunConfig()


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model folders or run folders (their model/), or tiny")
    p.add_argument("--data", required=True, help="held-out preference pairs (any format the data layer reads)")
    p.add_argument("--baseline", help="the model to win against and the DPO family's reference "
                                      "(e.g. the starting SFT model)")
    p.add_argument("--reward-model", help="a sequence-classification reward model folder (or tiny) for win rates")
    p.add_argument("--out", help="report folder (default: <output.root>/eval)")
    p.add_argument("--config", help="YAML config for tokenization and generation settings "
                                    "(default: the first model's card, else the defaults)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate for (default 64)")
    p.add_argument("--max-tokens", type=int, help="reply cap in tokens (default eval.generate_max_tokens)")
    p.add_argument("--backend", choices=("vllm", "transformers"), help="generation backend (default generate.backend)")
    p.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="an override of --config, e.g. --set data.max_length=512 (repeatable)")
