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
import sys
from collections import Counter
from pathlib import Path

from simpo_ray.data import model_vocab_size
from simpo_ray.rows import NON_FATAL, Duplicates, process_row, row_options
from simpo_ray.sources import RowError, expand_files, iter_file_rows
from simpo_ray.tokens import streams_for

PERCENTILES = (50, 90, 95, 99, 100)


def training_tokenizer(cfg, tokenizer=None):
    """(the tokenizer training uses, ``process_row``'s options for ``cfg.data``)."""
    from simpo_ray.models import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    return tokenizer, row_options(cfg.data, model_vocab_size(path))


def scan(sources, tokenizer, options):
    """(source, row number, triplet or the RowError) for every row of ``sources``, in
    file order, through the same row -> triplet code as training."""
    for src in sources:
        for n, row in iter_file_rows(src):
            try:
                if isinstance(row, RowError):
                    raise row
                yield src, n, process_row(tokenizer, row, **options)[1]
            except RowError as e:
                yield src, n, e


def inspect(cfg, tokenizer=None, show: int = 5) -> dict:
    """Scan every row of ``cfg.data``'s sources. Returns the report dict (JSON-able)."""
    d = cfg.data
    tokenizer, options = training_tokenizer(cfg, tokenizer)
    eval_sources = expand_files(d.eval_files) if d.eval_files else []
    sources = expand_files(d.train_files) + eval_sources
    reasons: Counter = Counter()
    notes: Counter = Counter()
    offenders, rows_read, truncated, sample = [], 0, 0, None
    raw = {"prompt": [], "chosen": [], "rejected": []}
    kept = []  # (prompt, chosen, rejected) lengths after truncation
    repeats = Duplicates() if d.dedup else None
    for src, n, t in scan(sources, tokenizer, options):
        rows_read += 1
        if repeats is not None and not isinstance(t, RowError) and src not in eval_sources:
            t = repeats.check(t["pair_key"], src, n) or t  # training's rule: the first one is kept
        if isinstance(t, RowError):
            reasons[t.reason] += 1
            offenders.append((src, n, str(t), t.reason))
            continue
        for k in raw:
            raw[k].append(t[f"{k}_len"])
        kept.append((len(t["prompt_ids"]), len(t["chosen_ids"]), len(t["rejected_ids"])))
        truncated += bool(t["truncated"])
        notes.update(t.get("notes") or [])
        sample = sample or {"source": src, "row": n, **rendered(tokenizer, t)}
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
        "token_policy": streams_for(tokenizer, d.add_bos, d.allow_special_tokens_in_text).describe(),
        "token_notes": dict(notes), "sample": sample,
        "_lengths": raw,
    }


def rendered(tokenizer, t: dict) -> dict:
    """A triplet's streams as text, exactly as training sees them (special tokens shown)."""
    return {k: tokenizer.decode(t[f"{k}_ids"], skip_special_tokens=False) for k in ("prompt", "chosen", "rejected")}


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
    p = rep["token_policy"]
    lines.append(f"token policy: add_bos {p['add_bos']} (BOS {p['bos']}; template writes it: "
                 f"{p['template_writes_bos']}; tokenizer expects it: {p['tokenizer_expects_bos']}; added: "
                 f"{p['bos_added']}), completions end with {p['end_of_turn']}, generation stops at "
                 f"{', '.join(map(str, p['stop_tokens']))}, special-token strings in text: {p['special_tokens_in_text']}")
    lines.append("token notes (rows kept): " + (", ".join(f"{k}: {n}" for k, n in sorted(rep["token_notes"].items()))
                                                or "none"))
    if rep["sample"]:
        sm = rep["sample"]
        lines.append(f"sample ({sm['source']} row {sm['row']}), as training sees it:")
        lines += [f"  {k:<9}{json.dumps(sm[k], ensure_ascii=False)}" for k in ("prompt", "chosen", "rejected")]
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


def tokens(cfg, rows: int = 5, as_json: bool = False, out=None) -> int:
    """``data tokens``: the first ``rows`` train rows as training tokenizes them. JSON:
    one object per row with ``row``, ``source`` and ``prompt_ids`` / ``chosen_ids`` /
    ``rejected_ids`` (or ``error`` and ``reason`` for a row training drops)."""
    import itertools
    import sys

    out = out or sys.stdout
    tokenizer, options = training_tokenizer(cfg)
    for src, n, t in itertools.islice(scan(expand_files(cfg.data.train_files), tokenizer, options), rows):
        if isinstance(t, RowError):
            rec = {"source": src, "row": n, "error": str(t), "reason": t.reason}
            print(json.dumps(rec) if as_json else f"{src} row {n}: dropped ({t.reason}): {t}", file=out)
            continue
        ids = {k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        if as_json:
            print(json.dumps({"source": src, "row": n, **ids, "truncated": t["truncated"],
                              "notes": t["notes"]}), file=out)
            continue
        text = rendered(tokenizer, t)
        print(f"{src} row {n}: " + ", ".join(f"{k[:-4]} {len(v)}" for k, v in ids.items()) + " tokens"
              + (" (truncated)" if t["truncated"] else "") + "".join(f"; {x}" for x in t["notes"]), file=out)
        for k in ("prompt", "chosen", "rejected"):
            pieces = tokenizer.convert_ids_to_tokens(ids[f"{k}_ids"])
            print(f"  {k:<9}{json.dumps(text[k], ensure_ascii=False)}\n  {'':<9}{'|'.join(pieces)}\n"
                  f"  {'':<9}{ids[f'{k}_ids']}", file=out)
    return 0


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
    if not rep["pairs"]:
        print("simpo-ray: no training pairs in the data: training would stop before it starts", file=sys.stderr)
        return 1
    if rep["strict"] and rep["malformed"]:
        print(f"simpo-ray: {rep['malformed']} malformed row(s): a strict run stops on them "
              "(fix them, or set data.strict=false to drop and count them)")
        return 1
    return 0
