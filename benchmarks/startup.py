"""Start-up cost: time from the command's start to its first training step, against the
import floor measured in the same run.

    python benchmarks/startup.py [--config examples/tiny_cpu.yaml] [--repeats 2] [--out startup.json]

- **import floor** (baseline): a fresh interpreter importing what a training run cannot
  do without (torch, transformers, deepspeed, ray.train.torch), wall seconds.
- **first step**: ``simpo-ray train CONFIG`` in a fresh process with a fresh run folder
  (``train.max_steps=2``, no probes), wall seconds from its start until ``metrics.jsonl``
  holds its first line with a step >= 1. The driver's own lines are time-stamped as they
  are read, so the phases show where the time goes (Ray up and data read, plan, worker
  group, first step).

Prints one table and writes JSON with the figures and ``ratio`` (first step / import
floor); the issue's target is a ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOOR = "import torch, transformers, deepspeed, ray.train.torch"
# Driver lines that end a phase, in the order they come.
MARKS = (("data", "[simpo-ray] data:"), ("plan", "[simpo-ray] plan:"),
         ("workers", "Started training worker group"))


def import_floor() -> float:
    t = time.time()
    subprocess.run([sys.executable, "-c", FLOOR], check=True, env=_env())
    return time.time() - t


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def first_step(config: str, root: str) -> dict:
    """One fresh train run: seconds to each phase mark, to the first step, to the exit."""
    cmd = [sys.executable, "-m", "simpo_ray.cli", "train", config, f"output.root={root}",
           "output.name=startup", "train.max_steps=2", "eval.generate_every=0", "output.export=false"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, tail = {}, []

    def read():
        for line in proc.stdout:
            tail.append(line)
            for name, text in MARKS:
                if name not in marks and text in line:
                    marks[name] = time.time() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics = Path(root) / "startup" / "metrics.jsonl"
    first = None
    while proc.poll() is None and first is None:
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= 1
                                     for x in metrics.read_text().splitlines() if x.strip()):
            first = time.time() - start
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=10)
    if proc.returncode != 0 or first is None:
        raise SystemExit("the run failed:\n" + "".join(tail[-40:]))
    return {**{k: round(v, 2) for k, v in marks.items()}, "first_step": round(first, 2),
            "exit": round(time.time() - start, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/tiny_cpu.yaml")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    floors, runs = [], []
    for _ in range(a.repeats):
        floors.append(import_floor())
        with tempfile.TemporaryDirectory() as root:
            runs.append(first_step(a.config, root))
    best = min(runs, key=lambda r: r["first_step"])
    floor = min(floors)
    out = {"config": a.config, "import_floor_s": round(floor, 2), "first_step_s": best["first_step"],
           "ratio": round(best["first_step"] / floor, 2), "phases_s": best, "runs": runs,
           "import_floors_s": [round(f, 2) for f in floors]}
    # Printed here, not through simpo_ray.tables: the script imports nothing of the package,
    # so the same file measures an older checkout (the baseline row in benchmarks/README.md).
    print("| import floor s | data read s | plan s | workers up s | first step s | exit s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {floor:.2f} | {best.get('data', float('nan')):.2f} | {best.get('plan', float('nan')):.2f} | "
          f"{best.get('workers', float('nan')):.2f} | {best['first_step']:.2f} | {best['exit']:.2f} | "
          f"{out['ratio']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
