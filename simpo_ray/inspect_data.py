"""``simpo-ray data inspect CONFIG.yaml``: look at the data before training on it.

Runs the same row -> triplet code as training (``rows.process_row``) in this process
(no Ray) over the train and eval sources, and reports: rows dropped per reason (with
the first offenders), token-length percentiles for prompt / chosen / rejected before
truncation, the share of pairs truncated, padding waste padded vs packed at the
configured micro-batch size, and a length histogram PNG. Exit code 1 when a strict
run would stop on these rows (malformed rows), else 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from simpo_ray.data import model_vocab_size
from simpo_ray.rows import NON_FATAL, process_row
from simpo_ray.sources import RowError, expand_files, iter_file_rows

PERCENTILES = (50, 90, 95, 99, 100)


def inspect(cfg, tokenizer=None, show: int = 5) -> dict:
    """Scan every row of ``cfg.data``'s sources. Returns the report dict (JSON-able)."""
    from simpo_ray.models import resolve_model_path

    d = cfg.data
    path = resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    vocab_size = model_vocab_size(path)
    sources = expand_files(d.train_files) + (expand_files(d.eval_files) if d.eval_files else [])
    reasons: Counter = Counter()
    offenders, rows_read, truncated = [], 0, 0
    raw = {"prompt": [], "chosen": [], "rejected": []}
    kept = []  # (prompt, chosen, rejected) lengths after truncation
    for src in sources:
        for n, row in iter_file_rows(src):
            rows_read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                _, t = process_row(tokenizer, row, max_length=d.max_length,
                                   max_prompt_length=d.max_prompt_length, column_map=d.column_map or None,
                                   vocab_size=vocab_size)
            except RowError as e:
                reasons[e.reason] += 1
                offenders.append((src, n, str(e), e.reason))
                continue
            for k in raw:
                raw[k].append(t[f"{k}_len"])
            kept.append((len(t["prompt_ids"]), len(t["chosen_ids"]), len(t["rejected_ids"])))
            truncated += bool(t["truncated"])
    fatal = sorted(o for o in offenders if o[3] not in NON_FATAL)
    pairs = len(kept)
    return {
        "sources": sources, "rows": rows_read, "pairs": pairs, "strict": d.strict,
        "dropped": dict(reasons), "malformed": len(fatal),
        "first_offenders": [f"{s}: row {n}: {m}" for s, n, m, _ in (fatal or sorted(offenders))[:show]],
        "token_lengths": {k: _percentiles(v) for k, v in raw.items()},
        "truncated_pairs": truncated, "truncated_share": truncated / pairs if pairs else 0.0,
        "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
        "padding_waste": _waste(kept, cfg.train.micro_batch_size, d.pack_row_tokens),
        "_lengths": raw,
    }


def _percentiles(values) -> dict:
    import numpy as np

    if not values:
        return {}
    v = np.asarray(values)
    return {("max" if p == 100 else f"p{p}"): int(np.percentile(v, p, method="higher")) for p in PERCENTILES}


def _waste(kept: list, micro: int, max_tokens: int) -> dict:
    """Pad share of padded vs packed micro-batches of ``micro`` pairs, in file order."""
    from simpo_ray.collate import pack_rows

    pad = {"padded": [0, 0], "packed": [0, 0]}  # [real tokens, slots]
    for i in range(0, len(kept) - micro + 1, micro):
        group = kept[i:i + micro]
        lengths = [p + c for p, c, _ in group] + [p + r for p, _, r in group]
        real = sum(lengths)
        longest = -(-max(lengths) // 8) * 8
        rows, L = pack_rows(lengths, max_tokens, 8)
        pad["padded"][0] += real
        pad["padded"][1] += longest * len(lengths)
        pad["packed"][0] += real
        pad["packed"][1] += L * len(rows)
    return {k: (1 - r / s if s else 0.0) for k, (r, s) in pad.items()}


def format_report(rep: dict) -> str:
    lines = [f"sources: {', '.join(rep['sources'])}",
             f"rows read: {rep['rows']}; pairs kept: {rep['pairs']}; "
             f"mode: {'strict' if rep['strict'] else 'lenient'}"]
    if rep["dropped"]:
        lines.append("dropped per reason:")
        lines += [f"  {reason}: {n}" for reason, n in sorted(rep["dropped"].items(), key=lambda x: -x[1])]
        lines.append("first offenders:")
        lines += [f"  {o}" for o in rep["first_offenders"]]
    else:
        lines.append("dropped per reason: none")
    lines.append("token lengths before truncation (" + ", ".join(
        "max" if p == 100 else f"p{p}" for p in PERCENTILES) + "):")
    for k, v in rep["token_lengths"].items():
        lines.append(f"  {k:<9}" + " ".join(f"{x:>7}" for x in v.values()))
    lines.append(f"pairs truncated at max_length {rep['max_length']} / max_prompt_length "
                 f"{rep['max_prompt_length']}: {rep['truncated_pairs']} ({rep['truncated_share']:.1%})")
    w = rep["padding_waste"]
    lines.append(f"padding waste per micro-batch: padded {w['padded']:.1%}, packed {w['packed']:.1%}")
    return "\n".join(lines)


def write_histogram(rep: dict, path) -> Path:
    """Token-length histograms (prompt, chosen, rejected) with the truncation limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = [v for v in rep["_lengths"].values() if v]
    top = max((max(v) for v in values), default=1)
    bins = min(80, max(10, top))
    for name, v in rep["_lengths"].items():
        if v:
            ax.hist(v, bins=bins, range=(0, top), histtype="step", linewidth=1.5, label=name)
    ax.axvline(rep["max_prompt_length"], color="grey", linestyle=":", label="max_prompt_length")
    ax.axvline(rep["max_length"], color="black", linestyle="--", label="max_length")
    ax.set_xlabel("tokens (before truncation)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{rep['pairs']} pairs; {rep['truncated_share']:.1%} truncated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg, histogram=None, as_json: bool = False) -> int:
    """The command: print the report, write the PNG; 1 if a strict run would stop."""
    rep = inspect(cfg)
    png = write_histogram(rep, histogram or cfg.output.run_dir / "data_lengths.png")
    if as_json:
        print(json.dumps({k: v for k, v in rep.items() if not k.startswith("_")} | {"histogram": str(png)},
                         indent=1))
    else:
        print(format_report(rep))
        print(f"histogram: {png}")
    if rep["strict"] and rep["malformed"]:
        print(f"simpo-ray: {rep['malformed']} malformed row(s): a strict run stops on them "
              "(fix them, or set data.strict=false to drop and count them)")
        return 1
    return 0
