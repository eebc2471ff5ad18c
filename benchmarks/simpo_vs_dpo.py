"""SimPO vs DPO in simpo-ray's own training step: time per step and peak memory.

The paper (arXiv 2405.14734, Sec. 5 / Table 11 there) reports SimPO about 20% faster
and about 10% lighter than DPO, because DPO also runs a frozen reference model. Three
modes, the same tiny Llama, the same rows and micro-batches (``benchmarks/peer.py``'s
UltraFeedback-like generator), the same step (the worker's ``forward_batch`` /
``objective`` on a plain ``PolicyLogps``, backward, clipping, AdamW):

  simpo            loss: simpo. No reference anywhere.
  dpo-live         loss: dpo with the reference model in the same process: a second,
                   frozen copy of the starting weights runs a no-grad forward on the
                   same collated batch every step (what a trainer without a
                   precompute pass does; not a path simpo-ray itself takes).
  dpo-precomputed  loss: dpo with ``ref_chosen_logps`` / ``ref_rejected_logps`` in the
                   rows, computed beforehand by ``reference.ReferenceLogps`` (the
                   map_batches actor of simpo-ray's reference pass); the training
                   step only reads two numbers per pair. The pass itself is timed
                   apart: it costs one no-grad forward per pair per data pass.

Time: modes interleaved batch by batch; forward + backward the fastest of
``--repeats`` tries, then clipping + the optimizer step timed once (wall time, and
process CPU time as a steadier second figure on a shared machine); the first batch is
a warm-up on which both DPO modes must give ln 2 (policy = reference). Peak RSS: one
fresh subprocess per mode (the reference pass of dpo-precomputed runs before the
measured window, as it runs in other processes in the trainer), high-water mark reset
after the warm-up step, glibc mmap threshold fixed.

    python benchmarks/simpo_vs_dpo.py            # the table in benchmarks/README.md
    python benchmarks/simpo_vs_dpo.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peer  # noqa: E402  (benchmarks/peer.py: data, model sizes, RSS helpers)

MODES = ("simpo", "dpo-live", "dpo-precomputed")


class Step:
    """One mode's per-micro-batch work on a plain PolicyLogps (no Ray, no DeepSpeed)."""

    def __init__(self, mode: str, size: str, a, model_path: str, pad_id: int):
        import torch

        from simpo_ray.policy import PolicyLogps

        self.mode = mode
        self.cfg = peer.run_config(a, packing=not a.padded, loss="simpo" if mode == "simpo" else "dpo",
                                   beta=a.beta if mode == "simpo" else a.dpo_beta)
        self.pad_id = pad_id
        torch.manual_seed(0)
        lm = peer.base_model(size)
        self.policy = PolicyLogps(lm, chunk_size=self.cfg.model.logps_chunk_size)
        self.policy.device = torch.device("cpu")
        self.ref = None
        if mode == "dpo-live":
            self.ref = PolicyLogps(copy.deepcopy(lm), chunk_size=self.cfg.model.logps_chunk_size)
            self.ref.eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=a.lr, weight_decay=0.0)
        self.model_path = model_path

    def forward_backward(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.live_loss(batch) if self.ref is not None else self.worker_loss(batch)
        loss.backward()
        return loss.item()

    def worker_loss(self, batch):
        from simpo_ray.worker import forward_batch

        return forward_batch(self.policy, batch, self.cfg, self.pad_id)[0]

    def live_loss(self, batch):
        """forward_batch with a reference forward in place of the precomputed columns."""
        import torch

        from simpo_ray.objective import step_loss
        from simpo_ray.worker import collate

        b, extra = collate(batch, self.cfg, self.pad_id)
        args = (b["input_ids"], b.get("attention_mask"), b["labels"])
        with torch.no_grad():
            ref_sums, _ = self.ref(*args, sequence_index=b.get("sequence_index"), **extra)
        sums, counts = self.policy(*args, sequence_index=b.get("sequence_index"), **extra)
        return step_loss(self.cfg.simpo, sums, counts, ref_sums)[0]

    def optimizer_step(self) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)


def reference_columns(batches, a, model_path: str, pad_id: int, repeats: int = 1):
    """Add the reference pass's columns to each numpy batch; returns (batches, seconds per batch)."""
    from simpo_ray.reference import ReferenceLogps

    # packed like the training steps (data.packing, rows of <= 2 x max_length) unless --padded
    ref = ReferenceLogps(model_path, "float32", "sdpa", 1024, pad_id,
                         pack_max_tokens=None if a.padded else 2 * a.max_length)
    out, secs = [], []
    for b in batches:
        best = math.inf
        for _ in range(repeats):  # the fastest try, as for the training steps
            t0 = time.perf_counter()
            done = ref(b)
            best = min(best, time.perf_counter() - t0)
        out.append(done)
        secs.append(best)
    del ref
    return out, secs


def setup(a, size: str, tmp: str):
    from simpo_ray.tiny import build_tokenizer, materialize

    tok = build_tokenizer()
    rows = peer.ultrafeedback_like_rows(a.pairs, 0, a.max_length, a.max_length // 2)
    trips = peer.triplets(rows, tok)
    n = a.batches + 1 if not a.rss_child else a.rss_steps + 1
    batches = [peer.numpy_batch(trips[i:i + a.micro]) for i in range(0, n * a.micro, a.micro)]
    model_path = str(materialize(peer.model_spec(size), cache_root=tmp))
    return tok, batches, model_path


def throughput(size: str, a, tmp: str) -> dict:
    import torch

    tok, batches, model_path = setup(a, size, tmp)
    with_ref, ref_secs = reference_columns(batches, a, model_path, tok.pad_token_id, a.repeats)
    steps = {m: Step(m, size, a, model_path, tok.pad_token_id) for m in MODES}
    secs, cpu = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0.0)
    first = {}
    tokens = 0
    for i, (b, br) in enumerate(zip(batches, with_ref)):
        for mode in MODES:
            s, inp = steps[mode], br if mode == "dpo-precomputed" else b
            best = best_cpu = math.inf
            for _ in range(a.repeats if i else 1):
                t0, c0 = time.perf_counter(), time.process_time()
                loss = s.forward_backward(inp)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            s.optimizer_step()
            if i == 0:
                first[mode] = loss
                continue
            secs[mode] += best + time.perf_counter() - t0
            cpu[mode] += best_cpu + time.process_time() - c0
        if i:
            tokens += sum(2 * len(p) + len(c) + len(r) for p, c, r in
                          zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]))
    assert torch.get_num_threads() == a.threads
    n = len(batches) - 1
    return {"step_s": {m: secs[m] / n for m in MODES}, "step_cpu_s": {m: cpu[m] / n for m in MODES}, "tokens_per_s": {m: tokens / secs[m] for m in MODES},
            "reference_pass_s_per_batch": sum(ref_secs[1:]) / n, "first_loss": first,
            "dpo_first_loss_minus_ln2": max(abs(first[m] - math.log(2)) for m in ("dpo-live", "dpo-precomputed")),
            "timed_batches": n}


def rss_child(mode: str, size: str, a) -> dict:
    import gc

    import torch

    torch.set_num_threads(a.threads)
    import simpo_ray.reference  # noqa: F401  same imports in every mode
    import simpo_ray.worker  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        tok, batches, model_path = setup(a, size, tmp)
        imports_kib = peer.rss_kib("VmRSS")
        if mode == "dpo-precomputed":  # in the trainer this runs in Ray Data actors, before training
            batches, _ = reference_columns(batches, a, model_path, tok.pad_token_id)
            gc.collect()
        s = Step(mode, size, a, model_path, tok.pad_token_id)
        for i, b in enumerate(batches):
            s.forward_backward(b)
            s.optimizer_step()
            if i == 0:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                setup_kib = peer.rss_kib("VmRSS")
        peak_kib = peer.rss_kib("VmHWM")
    return {"peak_mib": peak_kib / 1024, "above_setup_mib": (peak_kib - setup_kib) / 1024,
            "setup_mib": setup_kib / 1024, "imports_mib": imports_kib / 1024}


def peak_rss(mode: str, size: str, a) -> dict:
    argv = ["--pairs", str(a.pairs), "--micro", str(a.micro), "--rss-steps", str(a.rss_steps),
            "--max-length", str(a.max_length), "--threads", str(a.threads), "--beta", str(a.beta),
            "--dpo-beta", str(a.dpo_beta), "--lr", str(a.lr)] + (["--padded"] if a.padded else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--rss-child", mode, "--size", size],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"RSS subprocess for {mode}/{size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["xs", "s"], choices=list(peer.SIZES))
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8, help="pairs per micro-batch = per optimizer step")
    ap.add_argument("--batches", type=int, default=12, help="timed micro-batches per mode and size")
    ap.add_argument("--repeats", type=int, default=3, help="forward+backward tries per batch (the fastest counts)")
    ap.add_argument("--rss-steps", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--beta", type=float, default=2.5, help="SimPO beta")
    ap.add_argument("--gamma-beta-ratio", type=float, default=0.55)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--padded", action="store_true", help="data.packing: false (default: packed, as in peer.py)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--rss-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.pairs, a.micro, a.batches, a.repeats, a.rss_steps, a.max_length = ["xs"], 16, 2, 2, 1, 1, 128
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.rss_child:
        print(json.dumps(rss_child(a.rss_child, a.size, a)))
        return {}
    print(f"load average at start: {peer.loadavg()}; torch {torch.__version__}, {a.threads} thread(s); "
          f"{'padded' if a.padded else 'packed'} batches of {a.micro} pairs, max_length {a.max_length}")
    results = {"args": vars(a), "loadavg_start": peer.loadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            t = throughput(size, a, tmp)
            if t["dpo_first_loss_minus_ln2"] > 1e-5:
                raise AssertionError(f"{size}: DPO at step 0 is not ln 2: {t['first_loss']}")
            mem = {m: peak_rss(m, size, a) for m in MODES}
            results["sizes"][size] = {**t, "rss": mem}
            print(f"\n{size} {peer.SIZES[size]}: {t['timed_batches']} timed steps; DPO losses at step 0 within "
                  f"{t['dpo_first_loss_minus_ln2']:.1e} of ln 2; reference pass {t['reference_pass_s_per_batch']:.3f} "
                  f"s per batch (once per data pass); load {peer.loadavg()}")
            print("| mode | step s | time vs simpo | CPU time vs simpo | peak RSS MiB | vs simpo "
                  "| RSS above setup MiB | vs simpo |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for m in MODES:
                st, r, r0 = t["step_s"][m], mem[m], mem["simpo"]
                ct = t["step_cpu_s"][m] / t["step_cpu_s"]["simpo"]
                print(f"| {m} | {st:.3f} | {st / t['step_s']['simpo']:.2f} | {ct:.2f} | {r['peak_mib']:.0f} | "
                      f"{r['peak_mib'] / r0['peak_mib']:.3f} | {r['above_setup_mib']:.0f} | "
                      f"{r['above_setup_mib'] / r0['above_setup_mib']:.2f} |")
            pre = t["step_s"]["dpo-precomputed"] + t["reference_pass_s_per_batch"]
            print(f"dpo-precomputed incl. its reference pass (1 epoch): {pre:.3f} s per step, "
                  f"{pre / t['step_s']['simpo']:.2f} x simpo")
    return peer.finish(results, a.json)


if __name__ == "__main__":
    main()
