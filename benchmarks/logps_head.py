"""Loss head benchmark: plain (hidden @ W.T, then sequence_logps) vs chunked.

Measures forward + backward of the loss head only (hidden states -> per-sequence
average log-probs -> sum -> grads for hidden and lm_head weight), on CPU.

Memory, honestly: torch has no allocator statistics on CPU and tracemalloc does
not see torch's allocations, so each (method, vocab, seq_len) case runs in a fresh
subprocess and we read the kernel's resident-set high-water mark (VmHWM). Before
each step the mark is reset to the current RSS (``echo 5 > /proc/self/clear_refs``,
Linux >= 4.0), so "peak" is the extra resident memory the step needed above what was
already live (inputs, weights, torch itself); we report the largest over the timed
steps (the full-size warm-up step is left out: it also fills one-time per-shape
caches). The subprocesses run with a fixed glibc mmap threshold
(MALLOC_MMAP_THRESHOLD_=1048576) so freed buffers go back to the kernel and RSS
follows live tensors. Both methods return the same gradients (hidden, weight), so
those count in both peaks alike. If the reset is not allowed we fall back to
``ru_maxrss`` of the fresh process minus its RSS just before the first step.

Time: the fastest (min) wall time of the timed steps that follow one untimed
warm-up step; the minimum, not the median, because noise from other processes on
a shared machine only ever adds. The CPU-time ratio compares CPU seconds per step
(all threads, user + sys), which other processes disturb less. "sys %" is the
share of the step's CPU time spent in the kernel, mostly page faults on freshly
mapped buffers.

    python benchmarks/logps_head.py            # full table (about 5 min on 2 cores)
    python benchmarks/logps_head.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    """Run one case in this (fresh) process and print one JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    from simpo_ray.logps import chunked_sequence_logps, sequence_logps

    torch.manual_seed(0)
    B, T, H, V = args.batch, args.seq_len, args.hidden, args.vocab

    def make_inputs(B, T, H, V):
        hidden = torch.randn(B, T, H, requires_grad=True)
        weight = (torch.randn(V, H) / H**0.5).requires_grad_()
        labels = torch.randint(0, V, (B, T))
        # Chosen row then rejected row: a shared prompt of prompt_frac * T tokens is
        # masked, and the rejected completion is 1/8 shorter (right padding).
        labels[:, : int(args.prompt_frac * T)] = -100
        labels[1:, T - T // 8 :] = -100
        return hidden, weight, labels

    def step(hidden, weight, labels):
        if args.method == "plain":
            out = sequence_logps(hidden @ weight.T, labels)
        else:
            out = chunked_sequence_logps(hidden, weight, labels, chunk_size=args.chunk_size)
        grads = torch.autograd.grad(out.sum(), (hidden, weight))
        return out, grads

    step(*make_inputs(2, 16, 8, 64))  # lazy init of kernels and thread pools, not measured
    inputs = make_inputs(B, T, H, V)

    peaks, times, user, system = [], [], 0.0, 0.0
    can_reset = _reset_peak()
    for i in range(args.repeats + 1):
        rss_before = _status_kib("VmRSS")
        if can_reset:
            _reset_peak()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = step(*inputs)
        elapsed = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if can_reset and i > 0:
            peaks.append(max(0, _status_kib("VmHWM") - rss_before))
        elif not can_reset and i == 0:
            peaks.append(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before))
        del result
        if i > 0:
            times.append(elapsed)
            user += r1.ru_utime - r0.ru_utime
            system += r1.ru_stime - r0.ru_stime
    print(json.dumps({
        "peak_mib": max(peaks) / 1024,
        "time_s": min(times),
        # Kernel time is mostly page faults on freshly mapped buffers (see README).
        "sys_share": system / max(user + system, 1e-9),
        # CPU seconds per step (all threads): less sensitive than wall time to
        # other processes competing for the cores.
        "cpu_s": (user + system) / len(times),
        "memory_method": "VmHWM reset per step" if can_reset else "ru_maxrss, first step",
    }))


def run_case(args: argparse.Namespace, method: str, vocab: int, seq_len: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--method", method,
        "--vocab", str(vocab), "--seq-len", str(seq_len), "--hidden", str(args.hidden),
        "--batch", str(args.batch), "--repeats", str(args.repeats),
        "--chunk-size", str(args.chunk_size), "--prompt-frac", str(args.prompt_frac),
    ]
    # A fixed 1 MiB mmap threshold makes glibc map every large buffer on allocation and
    # unmap it on free, so RSS follows the live tensors instead of whatever the heap
    # happened to retain (with the default dynamic threshold, buffers under 32 MiB are
    # kept and reused, which made small-chunk peaks depend on allocation order).
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", **os.environ}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if b > 0 else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="rows: chosen + rejected")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--prompt-frac", type=float, default=0.25, help="share of each row that is masked prompt")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.vocab, args.seq_len = args.vocab[0], args.seq_len[0]
        worker(args)
        return
    if args.smoke:
        args.vocab, args.seq_len, args.hidden, args.repeats, args.chunk_size = [1000], [64], 32, 1, 32

    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"B={args.batch}, H={args.hidden}, fp32, chunk_size={args.chunk_size}, "
          f"prompt_frac={args.prompt_frac}, repeats={args.repeats}, MALLOC_MMAP_THRESHOLD_=1048576")
    print("| vocab | T | plain peak MiB | chunked peak MiB | memory ratio | plain s | chunked s "
          "| time ratio | CPU-time ratio | plain sys % | chunked sys % |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        for seq_len in args.seq_len:
            plain = run_case(args, "plain", vocab, seq_len)
            chunked = run_case(args, "chunked", vocab, seq_len)
            print(
                f"| {vocab} | {seq_len} | {plain['peak_mib']:.0f} | {chunked['peak_mib']:.0f} "
                f"| {_ratio(chunked['peak_mib'], plain['peak_mib'], 3)} | {plain['time_s']:.3f} "
                f"| {chunked['time_s']:.3f} | {_ratio(chunked['time_s'], plain['time_s'])} "
                f"| {_ratio(chunked['cpu_s'], plain['cpu_s'])} "
                f"| {100 * plain['sys_share']:.0f} | {100 * chunked['sys_share']:.0f} |",
                flush=True,
            )
    print(f"# memory: {plain['memory_method']}")


if __name__ == "__main__":
    main()
