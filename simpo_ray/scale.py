"""``simpo-ray scale``: the same short training for a ladder of model sizes; cost against size.

For each size the config's architecture is scaled (hidden size and layers; heads and MLP
width follow) and trained for a few optimizer steps by ``simpo_ray.train.fit``, the
same run as ``simpo-ray train`` (Ray Data batches, DeepSpeed workers, a report per
step); the numbers come from those step reports and the final checkpoint. Recorded
per size: parameters, tokens/s per worker, step time,
peak memory per worker (host RSS; GPU allocator peak on GPUs), model FLOPs
utilisation against the device peak, checkpoint size (all ranks' DeepSpeed shards)
and its save time. Written to a CSV and a log-log PNG of cost against parameters.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 x (parameters
that do matmuls) + 12 x layers x q_dim x T, T = mean sequence length of the step. The
first optimizer step is warm-up and is not timed; the step time is the median of the rest.

Sizes: ``HIDDENxLAYERS`` (e.g. 256x4) or a preset name (PRESETS). Heads give a head
size of 64 (128 from hidden 2048), MLP width 4 x hidden (the tiny model's ratio).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Optional

from simpo_ray import tables
from simpo_ray.metrics import read_reports
from simpo_ray.config import RunConfig

# Named sizes: a CPU ladder for CI and a GPU ladder (~0.4B-8.6B with the tiny byte
# vocabulary; Llama-like widths and depths).
PRESETS = {
    "xs": (64, 2), "s": (128, 4), "m": (256, 4), "l": (384, 6), "xl": (512, 8),
    "0.5b": (1024, 24), "1b": (2048, 16), "3b": (2560, 28), "8b": (4096, 32),
}
H100_BF16_DENSE_TFLOPS = 989.0
# A cost that grows faster than parameters by more than this (log-log slope > 1 + this)
# is flagged.
SLOPE_TOLERANCE = 0.25

CSV_FIELDS = [
    "size", "hidden", "layers", "heads", "intermediate", "params", "workers", "micro_batch",
    "steps_timed", "tokens_per_step_per_worker", "mean_seq_len", "step_time_s", "tokens_per_s_per_worker",
    "flops_per_token", "achieved_tflops_per_worker", "peak_tflops_per_worker", "mfu",
    "peak_rss_gib", "model_rss_gib", "peak_gpu_gib", "checkpoint_gib", "checkpoint_save_s",
    "host_load_1m", "time_slope", "memory_slope", "flag",
]


def parse_size(text: str) -> tuple[str, int, int]:
    """'256x4' or a preset name -> (label, hidden, layers)."""
    t = text.strip().lower()
    if t in PRESETS:
        return t, *PRESETS[t]
    m = re.fullmatch(r"(\d+)x(\d+)", t)
    if not m:
        raise ValueError(f"size {text!r}: use HIDDENxLAYERS (e.g. 256x4) or one of {', '.join(PRESETS)}")
    hidden, layers = int(m.group(1)), int(m.group(2))
    if hidden < 32 or hidden % 32 or layers < 1:
        raise ValueError(f"size {text!r}: hidden must be a multiple of 32 (>= 32), layers >= 1")
    return t, hidden, layers


def scaled_dims(hidden: int, layers: int) -> dict:
    head_dim = 128 if hidden >= 2048 else 64
    heads = max(2, hidden // head_dim)
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "intermediate_size": 4 * hidden}


def size_config(cfg: RunConfig, hidden: int, layers: int, model_dir: Optional[str] = None) -> RunConfig:
    """The run config for one rung: the tiny spec scaled, or (HF models) the folder
    built by ``build_scaled_model``."""
    d = cfg.to_dict()
    dims = scaled_dims(hidden, layers)
    if cfg.model.name_or_path == "tiny":
        d["model"]["tiny"].update(dims)
        d["model"]["tiny"]["max_position_embeddings"] = max(d["model"]["tiny"]["max_position_embeddings"],
                                                             cfg.data.max_length)
    else:
        d["model"]["name_or_path"] = model_dir
    return RunConfig.from_dict(d)


def build_scaled_model(base: str, hidden: int, layers: int, out_root: Path, seed: int = 0,
                       trust_remote_code: bool = False) -> str:
    """A randomly initialised copy of ``base``'s architecture at (hidden, layers), with
    ``base``'s tokenizer, saved to a folder (its path is returned). Only the config and
    tokenizer of ``base`` are read, never its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_root) / f"{Path(base).name}-{hidden}x{layers}"
    if (out / "config.json").exists():
        return str(out)
    hf = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    dims = scaled_dims(hidden, layers)
    kv_ratio = max(1, hf.num_attention_heads // (getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads))
    hf.hidden_size, hf.num_hidden_layers = hidden, layers
    hf.num_attention_heads = dims["num_heads"]
    hf.num_key_value_heads = max(1, dims["num_heads"] // kv_ratio)
    hf.intermediate_size = dims["intermediate_size"]
    if getattr(hf, "head_dim", None):
        hf.head_dim = hidden // dims["num_heads"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def summarize(label: str, dims: dict, shape, reports: list, cfg: RunConfig, peak_tflops: Optional[float],
              checkpoint_bytes: int) -> dict:
    """Per-rung row from the run's step reports (``train.log_every`` 1: one per optimizer
    step). Step time: the workers' own wall time per step (``step_time_s``; every rank
    waits for the slowest in the step's collectives), median over the timed steps, the
    first being warm-up; tokens: global non-pad tokens per step over the workers;
    memory: the largest worker's peaks (``sys/peak_rss_mb``, ``sys/model_rss_mb``,
    ``sys/gpu_peak_mb``)."""
    steps = [m for m in reports if "step_time_s" in m]
    timed = steps[1:] if len(steps) > 1 else steps
    workers = cfg.train.num_workers
    step_time = statistics.median(m["step_time_s"] for m in timed)
    tok = statistics.mean(m["tokens_per_s"] * m["step_time_s"] for m in timed) / workers
    seqs = statistics.mean(2 * m["pairs"] for m in timed) / workers
    mean_len = tok / max(seqs, 1)
    tps = tok / step_time
    fpt = shape.flops_per_token(int(round(mean_len)))
    achieved = tps * fpt / 1e12
    peak = lambda key: max(m.get(key, 0.0) for m in steps) * 2**20 / 2**30  # noqa: E731 - MiB -> GiB
    return {
        "size": label, "hidden": dims["hidden_size"], "layers": dims["num_layers"], "heads": dims["num_heads"],
        "intermediate": dims["intermediate_size"], "params": shape.params(), "workers": workers,
        "micro_batch": cfg.train.micro_batch_size, "steps_timed": len(timed),
        "tokens_per_step_per_worker": round(tok, 1), "mean_seq_len": round(mean_len, 1),
        "step_time_s": round(step_time, 4), "tokens_per_s_per_worker": round(tps, 1),
        "flops_per_token": int(fpt), "achieved_tflops_per_worker": _sig(achieved),
        "peak_tflops_per_worker": _sig(peak_tflops) if peak_tflops else "",
        "mfu": _sig(achieved / peak_tflops) if peak_tflops else "",
        "peak_rss_gib": _sig(peak("sys/peak_rss_mb")), "model_rss_gib": _sig(peak("sys/model_rss_mb")),
        "peak_gpu_gib": _sig(peak("sys/gpu_peak_mb")),
        "checkpoint_gib": _sig(checkpoint_bytes / 2**30),
        "checkpoint_save_s": round(max(m.get("sys/checkpoint_save_s", 0.0) for m in steps), 3),
    }


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def flag_growth(rows: list, tolerance: float = SLOPE_TOLERANCE) -> list:
    """Log-log slopes between neighbouring sizes: time per token (1 / tokens per s) and
    model memory against parameters. A slope above 1 + tolerance means the cost grows
    faster than the model: flagged."""
    rows = sorted(rows, key=lambda r: r["params"])
    prev = None
    for r in rows:
        r["time_slope"] = r["memory_slope"] = r["flag"] = ""
        if prev is not None and r["params"] > prev["params"]:
            dp = math.log(r["params"] / prev["params"])
            ts = math.log(prev["tokens_per_s_per_worker"] / r["tokens_per_s_per_worker"]) / dp
            r["time_slope"] = round(ts, 3)
            mem, pmem = _memory(r), _memory(prev)
            ms = math.log(mem / pmem) / dp if mem > 0 and pmem > 0 else None
            r["memory_slope"] = round(ms, 3) if ms is not None else ""
            flags = []
            if ts > 1 + tolerance:
                flags.append(f"time grows as params^{ts:.2f}")
            if ms is not None and ms > 1 + tolerance:
                flags.append(f"memory grows as params^{ms:.2f}")
            r["flag"] = "; ".join(flags)
        prev = r
    return rows


def _memory(r: dict) -> float:
    return r["peak_gpu_gib"] or r["model_rss_gib"]


def write_csv(rows: list, path: Path) -> None:
    tables.write_csv(rows, path, CSV_FIELDS)


def plot(rows: list, path: Path, title: str, tolerance: float = SLOPE_TOLERANCE) -> None:
    """Log-log: time per token, memory and checkpoint size against parameters, each
    with a slope-1 line through the smallest size (cost proportional to the model);
    a point is red where that cost grew faster than the parameters since the last size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["params"] for r in rows]
    gpu = any(r["peak_gpu_gib"] for r in rows)
    series = [
        ("time per token per worker (s)", [1.0 / r["tokens_per_s_per_worker"] for r in rows]),
        ("peak GPU memory per worker (GiB)" if gpu else "peak RSS above start-up per worker (GiB)",
         [_memory(r) for r in rows]),
        ("checkpoint size, all ranks (GiB)", [r["checkpoint_gib"] for r in rows]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (name, y) in zip(axes, series):
        ax.loglog(x, y, "o-", label="measured")
        fast = [(x[i], y[i]) for i in range(1, len(x))
                if x[i] > x[i - 1] and y[i] > 0 and y[i - 1] > 0
                and math.log(y[i] / y[i - 1]) / math.log(x[i] / x[i - 1]) > 1 + tolerance]
        if fast:
            ax.loglog(*zip(*fast), "o", color="red", label=f"grew faster than params^{1 + tolerance:g}")
        if y[0] > 0:
            ax.loglog([x[0], x[-1]], [y[0], y[0] * x[-1] / x[0]], "--", color="gray", label="proportional to params")
        ax.set_xlabel("parameters")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_scale(cfg: RunConfig, sizes: list, steps: int, out_dir: Path, peak_tflops: Optional[float] = None,
              tolerance: float = SLOPE_TOLERANCE) -> list:
    """Train every size for ``steps`` optimizer steps (the first untimed) with
    ``train.fit``, a report per step and one checkpoint at the end; returns rows and
    writes ``scale.csv``, ``scale.png`` and ``scale.json`` into ``out_dir``."""
    from simpo_ray.shapes import model_shape
    from simpo_ray.train import fit, prepare

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rungs = [parse_size(s) for s in sizes]
    if steps < 2:
        raise ValueError("steps must be >= 2 (the first step is warm-up, not timed)")
    t = cfg.train
    rows, prepared, stamp = [], None, int(time.time())
    for label, hidden, layers in rungs:
        model_dir = None
        if cfg.model.name_or_path != "tiny":
            # under output.root: on a cluster that is the shared file system every worker reads
            model_dir = build_scaled_model(cfg.model.name_or_path, hidden, layers,
                                           cfg.output.run_dir.parent / "scale-models",
                                           trust_remote_code=cfg.model.trust_remote_code)
        rcfg = rung_config(size_config(cfg, hidden, layers, model_dir), label, steps, stamp)
        if prepared is None:  # one tokenizer for the whole ladder: the data is prepared once
            prepared = prepare(rcfg)
            # Timing only: no held-out pass at the last step.
            prepared = dataclasses.replace(prepared, datasets={"train": prepared.datasets["train"]},
                                           plan=dataclasses.replace(prepared.plan, has_eval=False))
        shape = model_shape(rcfg)
        print(f"[simpo-ray scale] {label}: hidden {hidden}, layers {layers}, {shape.params():,} parameters, "
              f"{steps} steps on {t.num_workers} workers", flush=True)
        load_before = os.getloadavg()[0]
        result, summary = fit(rcfg, prepared)
        reports = read_reports(Path(summary["run_dir"]) / "metrics.jsonl")
        row = summarize(label, scaled_dims(hidden, layers), shape, reports, rcfg, peak_tflops,
                        _folder_bytes(result.checkpoint))
        # Timings on a shared machine are only as good as its quiet: keep the load next to them.
        row["host_load_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
        rows.append(row)
        print(f"[simpo-ray scale] {label}: step {row['step_time_s']:.3g} s, "
              f"{row['tokens_per_s_per_worker']:.0f} tokens/s/worker, peak RSS {row['peak_rss_gib']:.2f} GiB, "
              f"checkpoint {row['checkpoint_gib'] * 1024:.1f} MiB" + (f", MFU {row['mfu']:.3f}" if peak_tflops else ""),
              flush=True)
    rows = flag_growth(rows, tolerance)
    write_csv(rows, out_dir / "scale.csv")
    device = "GPU" if t.use_gpu else "CPU"
    peak_note = f"MFU peak {peak_tflops:g} TFLOP/s per worker" if peak_tflops else "no device peak given"
    loads = [r["host_load_1m"] for r in rows]
    plot(rows, out_dir / "scale.png",
         f"simpo-ray scale: {len(rows)} sizes, {t.num_workers} {device} workers, micro batch {t.micro_batch_size}, "
         f"{steps} steps; {peak_note}; host load {min(loads):g}-{max(loads):g} on {os.cpu_count()} cores",
         tolerance)
    (out_dir / "scale.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        if r["flag"]:
            print(f"[simpo-ray scale] FLAG {r['size']}: {r['flag']}", flush=True)
    return rows


def rung_config(cfg: RunConfig, label: str, steps: int, stamp: int) -> RunConfig:
    """A rung's run: ``steps`` steps, a report each, one checkpoint at the end, no
    held-out pass, no generation probe, no export, in a run folder of its own."""
    d = cfg.to_dict()
    d["train"].update(max_steps=steps, log_every=1, eval_every=10**9, checkpoint_every=steps, max_failures=0)
    d["eval"]["generate_every"] = 0
    d["output"].update(name=f"scale-{label}-{stamp}", export=False, keep_checkpoints=1)
    return RunConfig.from_dict(d)


def _folder_bytes(checkpoint) -> int:
    """Bytes of every file in a Ray checkpoint (all ranks' DeepSpeed shards)."""
    with checkpoint.as_directory() as d:
        return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def measure_cpu_gemm_tflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate with ``threads`` threads: a practical peak for one CPU worker."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best / 1e12


def resolve_peak(arg: Optional[str], cfg: RunConfig) -> tuple[Optional[float], str]:
    """--peak-tflops: a number, 'gemm' (CPU: measure one worker's fp32 GEMM rate here),
    or nothing (GPU: H100 bf16 dense; CPU: no MFU)."""
    if arg is None:
        if cfg.train.use_gpu:
            return H100_BF16_DENSE_TFLOPS, "H100 SXM bf16 dense peak (989 TFLOP/s); pass --peak-tflops for other GPUs"
        return None, "no device peak: pass --peak-tflops N or --peak-tflops gemm for MFU"
    if arg == "gemm":
        v = measure_cpu_gemm_tflops(int(cfg.train.cpus_per_worker))
        return v, f"measured fp32 GEMM peak of one worker's {int(cfg.train.cpus_per_worker)} thread(s): {v:.4f} TFLOP/s"
    v = float(arg)
    return v, f"given peak {v:g} TFLOP/s per worker"


def run_scale_cli(args) -> int:
    from simpo_ray.train import init_ray

    cfg = RunConfig.from_yaml(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    sizes = [s for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        parse_size(s)  # fail before Ray starts
    peak, note = resolve_peak(args.peak_tflops, cfg)
    print(f"[simpo-ray scale] MFU reference: {note}", flush=True)
    init_ray(cfg)
    rows = run_scale(cfg, sizes, args.steps, Path(args.out), peak, args.tolerance)
    print(f"[simpo-ray scale] wrote {Path(args.out) / 'scale.csv'} and {Path(args.out) / 'scale.png'} "
          f"({len(rows)} sizes)")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="xs,s,m",
                        help=f"comma-separated HIDDENxLAYERS or presets ({', '.join(PRESETS)}); default xs,s,m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per size, the first untimed (default 4)")
    parser.add_argument("--out", default="runs/scale", help="folder for scale.csv, scale.png, scale.json")
    parser.add_argument("--peak-tflops", help="device peak per worker in TFLOP/s for MFU, or 'gemm' to measure "
                                              "one CPU worker's fp32 GEMM rate (default: H100 bf16 on GPU, none on CPU)")
    parser.add_argument("--tolerance", type=float, default=SLOPE_TOLERANCE,
                        help="flag a cost whose log-log slope against parameters exceeds 1 + this (default 0.25)")
