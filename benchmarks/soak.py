"""Soak: worker memory over a long run of the tiny model.

Runs the real command (`simpo-ray train examples/tiny_cpu.yaml`, 2 ZeRO-3 workers over
gloo, 4 pairs a step, ~144 steps an epoch) for --steps optimizer steps with a checkpoint
every --checkpoint-every steps and a report every --log-every steps, then reads the
run's metrics.jsonl. Every report carries
`sys/rss_mb`, the largest worker's resident memory at that step (MiB).

Warm-up: the first --warmup steps (two checkpoints by default) may grow memory
(allocator pools, the first forward/backward buffers, the first saved shards). The
baseline is the median RSS of the reports in the --window steps that follow --warmup;
the end is the median of the reports in the last --window steps. The epoch boundaries
(steps ~144 and ~288) fall after the warm-up, so a per-epoch leak counts. Growth = end / baseline - 1, which must stay
under --max-growth (5%). Medians over a window, not single samples, so one
allocator hiccup does not decide the verdict.

    python benchmarks/soak.py                       # 300 steps, checkpoints every 25
    python benchmarks/soak.py --steps 60 --checkpoint-every 10 --log-every 1 --warmup 20 --window 10

The run folder goes under --out (runs/soak); the numbers (with load and command) to
<results>/soak.json and the figure to <results>/soak_rss.png (benchmarks/soak/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def command(out: Path, steps: int, checkpoint_every: int, log_every: int) -> list:
    """The training command: the tiny demo, smaller model, one micro-batch per step."""
    return [sys.executable, "-m", "simpo_ray.cli", "train", str(REPO / "examples" / "tiny_cpu.yaml"),
            f"output.root={out}", "output.name=soak", "output.export=false", "ray.num_cpus=4",
            "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=128", "train.total_batch_size=4", "train.micro_batch_size=2",
            "train.epochs=20", f"train.max_steps={steps}", f"train.log_every={log_every}", "train.eval_every=100000",
            f"train.checkpoint_every={checkpoint_every}", "output.keep_checkpoints=2"]


def rss_growth(lines: list, warmup: int, window: int) -> dict:
    """Reported RSS -> baseline (median over the ``window`` steps after ``warmup``), end
    (median over the last ``window`` steps) and growth (end / baseline - 1)."""
    steps = [(m["step"], m["sys/rss_mb"]) for m in lines if "sys/rss_mb" in m]
    last_step = steps[-1][0]
    if last_step < warmup + 2 * window:
        raise ValueError(f"need {warmup} warm-up steps + 2 windows of {window}; the run has {last_step}")
    after = [r for s, r in steps if warmup < s <= warmup + window]
    last = [r for s, r in steps if s > last_step - window]
    base, end = statistics.median(after), statistics.median(last)
    return {"baseline_mb": base, "end_mb": end, "growth": end / base - 1,
            "first_mb": steps[0][1], "max_mb": max(r for _, r in steps)}


def plot(lines: list, res: dict, warmup: int, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(m["step"], m["sys/rss_mb"]) for m in lines if "sys/rss_mb" in m]
    ckpts = [m["step"] for m in lines if m.get("checkpoint")]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s for s, _ in pts], [r for _, r in pts], lw=1.2, label="sys/rss_mb (largest worker)")
    for c in ckpts:
        ax.axvline(c, color="grey", lw=0.5, alpha=0.5)
    ax.axvspan(0, warmup, color="orange", alpha=0.12, label="warm-up")
    ax.axhline(res["baseline_mb"], color="green", ls="--", lw=1, label=f"baseline {res['baseline_mb']:.0f} MiB")
    ax.axhline(res["baseline_mb"] * 1.05, color="red", ls=":", lw=1, label="+5%")
    ax.set_xlabel("optimizer step (grey lines: checkpoints)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"worker RSS over {pts[-1][0]} steps: growth after warm-up {res['growth']:+.2%}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=5, help="steps per report (each carries sys/rss_mb)")
    p.add_argument("--warmup", type=int, default=50, help="steps excluded from the baseline")
    p.add_argument("--window", type=int, default=50, help="steps per median (baseline and end)")
    p.add_argument("--max-growth", type=float, default=0.05)
    p.add_argument("--out", default=str(REPO / "runs" / "soak"), help="parent of the run folder")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "soak"), help="soak.json + soak_rss.png")
    args = p.parse_args(argv)

    out = Path(args.out)
    run_dir = out / "soak"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: a rerun would resume it; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(out, args.steps, args.checkpoint_every, args.log_every)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    load_before, t0 = loadavg(), time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, load_after = time.time() - t0, loadavg()
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return proc.returncode
    from simpo_ray.metrics import read_reports

    lines = [m for m in read_reports(run_dir / "metrics.jsonl") if "loss" in m]
    res = rss_growth(lines, args.warmup, args.window)
    res.update(steps=lines[-1]["step"], checkpoints=sum(bool(m.get("checkpoint")) for m in lines),
               wall_s=round(wall, 1), loadavg_before=load_before, loadavg_after=load_after,
               warmup=args.warmup, window=args.window, command=" ".join(cmd[1:]),
               passed=res["growth"] < args.max_growth)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(lines, res, args.warmup, args.window, results / "soak_rss.png")
    (results / "soak.json").write_text(json.dumps(res, indent=1))
    print(f"{res['steps']} steps, {res['checkpoints']} checkpoints, {res['wall_s']} s; RSS first "
          f"{res['first_mb']:.0f} MiB, baseline (steps {args.warmup + 1}-{args.warmup + args.window}) "
          f"{res['baseline_mb']:.0f} MiB, end (last {args.window} steps) {res['end_mb']:.0f} MiB, max "
          f"{res['max_mb']:.0f} MiB: growth {res['growth']:+.2%} (limit {args.max_growth:.0%}) -> "
          f"{'PASS' if res['passed'] else 'FAIL'}; load {load_before} -> {load_after}")
    print(f"figure: {results / 'soak_rss.png'}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
