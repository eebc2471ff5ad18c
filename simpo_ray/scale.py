"""``simpo-ray scale``: the same short training for a ladder of model sizes; cost against size.

For each size the config's architecture is scaled (hidden size and layers; heads and MLP
width follow) and trained for a few optimizer steps by the real machinery: Ray Data
batches, a TorchTrainer of DeepSpeed workers, the worker's own ``forward_batch``. Each
worker measures itself; rank 0 gathers the numbers and hands them back through the
result's checkpoint. Recorded per size: parameters, tokens/s per worker, step time,
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


def measure_loop_per_worker(config: dict) -> None:
    """One rung on one worker: build the engine, run the planned optimizer steps, save a
    checkpoint to a private temp folder, and report what it cost. Collective: every
    rank runs the same steps (ZeRO-3 forwards are collectives)."""
    import resource
    import shutil
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    from simpo_ray.engine import build_engine, configure_threads
    from simpo_ray.models import resolve_model_path
    from simpo_ray.worker import forward_batch, iter_train, quiet_worker_logs

    cfg, plan = RunConfig.from_dict(config["run"]), config["plan"]
    quiet_worker_logs()
    configure_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    rss_before = _rss_bytes()
    model_path = resolve_model_path(cfg.model.name_or_path, plan["tiny_spec"])
    engine, _ = build_engine(cfg, model_path, plan["total_steps"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    shard = ray.train.get_dataset_shard("train")
    steps, step, epoch = [], 0, 0
    tokens = seqs = 0
    clock = time.perf_counter()
    while step < plan["total_steps"]:
        for batch in iter_train(shard, cfg, epoch):
            loss, _, n_tokens = forward_batch(engine, batch, cfg, plan)
            engine.backward(loss)
            engine.step()
            tokens += n_tokens
            seqs += 2 * len(batch["prompt_ids"])
            if engine.global_steps == step:
                continue
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step = engine.global_steps
            now = time.perf_counter()
            steps.append({"seconds": now - clock, "tokens": tokens, "seqs": seqs})
            tokens = seqs = 0
            clock = now
            if step >= plan["total_steps"]:
                break
        epoch += 1
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    tmp = tempfile.mkdtemp(prefix="simpo-scale-ckpt-")
    t0 = time.perf_counter()
    engine.save_checkpoint(tmp, tag="scale")
    save_s = time.perf_counter() - t0
    ckpt_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    shutil.rmtree(tmp, ignore_errors=True)
    mine = {
        "rank": dist.get_rank(), "steps": steps, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_model": rss_before, "peak_gpu": peak_gpu, "checkpoint_bytes": ckpt_bytes,
        "checkpoint_save_s": save_s,
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.lm.parameters()),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    report = {"scale": json.dumps(everyone)}
    checkpoint = None
    if dist.get_rank() == 0:  # a report carries metrics to the driver only with a checkpoint
        d = tempfile.mkdtemp(prefix="simpo-scale-")
        Path(d, "scale.json").write_text(json.dumps(everyone))
        checkpoint = ray.train.Checkpoint.from_directory(d)
    ray.train.report(report, checkpoint=checkpoint)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def summarize(label: str, dims: dict, shape, ranks: list, cfg: RunConfig, peak_tflops: Optional[float]) -> dict:
    """Per-rung row from every rank's measurements (step time: the slowest rank per
    step, median over the timed steps; memory: the largest rank)."""
    n_steps = min(len(r["steps"]) for r in ranks)
    timed = range(1, n_steps) if n_steps > 1 else range(n_steps)
    step_times = [max(r["steps"][i]["seconds"] for r in ranks) for i in timed]
    tok = statistics.mean(r["steps"][i]["tokens"] for r in ranks for i in timed)
    seqs = statistics.mean(r["steps"][i]["seqs"] for r in ranks for i in timed)
    step_time = statistics.median(step_times)
    mean_len = tok / max(seqs, 1)
    tps = tok / step_time
    fpt = shape.flops_per_token(int(round(mean_len)))
    achieved = tps * fpt / 1e12
    peak_rss = max(r["peak_rss"] for r in ranks)
    return {
        "size": label, "hidden": dims["hidden_size"], "layers": dims["num_layers"], "heads": dims["num_heads"],
        "intermediate": dims["intermediate_size"], "params": ranks[0]["params"], "workers": len(ranks),
        "micro_batch": cfg.train.micro_batch_size, "steps_timed": len(step_times),
        "tokens_per_step_per_worker": round(tok, 1), "mean_seq_len": round(mean_len, 1),
        "step_time_s": round(step_time, 4), "tokens_per_s_per_worker": round(tps, 1),
        "flops_per_token": int(fpt), "achieved_tflops_per_worker": _sig(achieved),
        "peak_tflops_per_worker": _sig(peak_tflops) if peak_tflops else "",
        "mfu": _sig(achieved / peak_tflops) if peak_tflops else "",
        "peak_rss_gib": _sig(peak_rss / 2**30),
        "model_rss_gib": _sig(max(r["peak_rss"] - r["rss_before_model"] for r in ranks) / 2**30),
        "peak_gpu_gib": _sig(max(r["peak_gpu"] for r in ranks) / 2**30),
        "checkpoint_gib": _sig(sum(r["checkpoint_bytes"] for r in ranks) / 2**30),
        "checkpoint_save_s": round(max(r["checkpoint_save_s"] for r in ranks), 3),
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
    """Train every size for ``steps`` optimizer steps (the first untimed); returns rows
    and writes ``scale.csv``, ``scale.png`` and ``scale.json`` into ``out_dir``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from simpo_ray.models import resolve_model_path
    from simpo_ray.shapes import model_shape
    from simpo_ray.train import prepare

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rungs = [parse_size(s) for s in sizes]
    if steps < 2:
        raise ValueError("steps must be >= 2 (the first step is warm-up, not timed)")
    t = cfg.train
    rows, prepared = [], None
    for label, hidden, layers in rungs:
        model_dir = None
        if cfg.model.name_or_path != "tiny":
            # under output.root: on a cluster that is the shared file system every worker reads
            model_dir = build_scaled_model(cfg.model.name_or_path, hidden, layers,
                                           cfg.output.run_dir.parent / "scale-models",
                                           trust_remote_code=cfg.model.trust_remote_code)
        rcfg = size_config(cfg, hidden, layers, model_dir)
        if prepared is None:  # one tokenizer for the whole ladder: the data is prepared once
            prepared = prepare(rcfg)
        plan = dict(prepared["plan"], tiny_spec=dataclasses.asdict(rcfg.model.tiny), total_steps=steps)
        # Build the rung's model folder here first, as train.prepare does: workers then find it
        # instead of all building it at once.
        resolve_model_path(rcfg.model.name_or_path, plan["tiny_spec"])
        shape = model_shape(rcfg)
        print(f"[simpo-ray scale] {label}: hidden {hidden}, layers {layers}, {shape.params():,} parameters, "
              f"{steps} steps on {t.num_workers} workers", flush=True)
        trainer = TorchTrainer(
            measure_loop_per_worker,
            train_loop_config={"run": rcfg.to_dict(), "plan": plan},
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            datasets={"train": prepared["datasets"]["train"]},
            # Train's storage as for `simpo-ray train` (shared on a cluster): rank 0's
            # measurements travel back through it.
            run_config=ray.train.RunConfig(name=f"scale-{label}-{int(time.time())}",
                                           storage_path=cfg.output.storage or str(cfg.output.run_dir.parent)),
        )
        load_before = os.getloadavg()[0]
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            ranks = json.loads(Path(d, "scale.json").read_text())
        row = summarize(label, scaled_dims(hidden, layers), shape, ranks, rcfg, peak_tflops)
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
    parser.add_argument("config", help="YAML config whose architecture and training settings are scaled")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.micro_batch_size=2")
    parser.add_argument("--sizes", default="xs,s,m",
                        help=f"comma-separated HIDDENxLAYERS or presets ({', '.join(PRESETS)}); default xs,s,m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per size, the first untimed (default 4)")
    parser.add_argument("--out", default="runs/scale", help="folder for scale.csv, scale.png, scale.json")
    parser.add_argument("--peak-tflops", help="device peak per worker in TFLOP/s for MFU, or 'gemm' to measure "
                                              "one CPU worker's fp32 GEMM rate (default: H100 bf16 on GPU, none on CPU)")
    parser.add_argument("--tolerance", type=float, default=SLOPE_TOLERANCE,
                        help="flag a cost whose log-log slope against parameters exceeds 1 + this (default 0.25)")
    parser.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
