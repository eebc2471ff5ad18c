"""``simpo-ray plan``: will this config fit, per GPU and per node, before a cluster is paid for.

Pure arithmetic on the model's shape (from its Hugging Face config, a built-in table of
known architectures, or the tiny spec) and the run config. Every number is an estimate
in bytes; the items and their formulas:

Model states per GPU, mixed precision (bf16 weights, fp32 master copy), N parameters,
W ranks. They follow DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``
and ``estimate_zero2_model_states_mem_needs``; tests/unit/test_planner.py checks that
they agree): ZeRO-3 holds 18 N / W bytes = bf16 weights 2 + fp32 gradients 4 + fp32
master 4 + Adam m, v 8, plus 4 bytes x the largest module while it is gathered (bf16
weight + bf16 gradient). ZeRO-2/1 keep the bf16 weights whole (2 N) and partition the
rest. fp32 runs: weights 4, gradients 4, Adam 8 (the weights are the master).
Optimizer offload moves gradients (fp32) and the optimizer to host RAM; parameter
offload moves the bf16 weights too.

Activations per GPU for a micro batch of m pairs = 2m sequences of T = data.max_length
tokens (chosen and rejected run in one forward), a bytes per element:
  per layer and token  a (4h + 3q + 3kv + 4I) + 16h   (saved inputs of the norms and
      projections, q/k/v before and after RoPE, attention output, the SwiGLU gate, up,
      activation and product; the two RMSNorms keep float32 copies)
  eager attention adds (2m x heads x T x T) scores: 4 + 2a bytes (+3a with soft-capping)
  gradient checkpointing: every layer's input (a h per token) + one layer recomputed;
  without: every layer's full set.
The logits head, V = vocab:
  chunked (model.logps_chunk_size > 0): one (chunk, V) float32 buffer and the weight's
      float32 gradient (4 V h) for fp32 weights; for bf16 ones blocks of (chunk, S)
      with S = 2^26 / h vocab rows, float32 slices of the weight and its gradient
      (8 S h) and a float32 grad of the scored hidden states (4 x tokens x h)
  plain (0, and always for soft-capped models like Gemma-2): the (2m, T, V) logits,
      their float32 rows kept for the log-softmax backward and the logits gradient:
      2m T V (2a + 4) (+a with soft-capping), plus two float32 rows (2 T V 4).
Runtime: CUDA context, NCCL buffers and allocator slack, a fixed allowance.

Host RAM per node: loading under zero.Init (ZeRO-3 through HfDeepSpeedConfig) needs
4 bytes x the largest module per rank with DeepSpeed's 1.5 buffer factor; without it
every rank holds the whole model. Offloaded states: 16 (optimizer) or 18 (+weights)
bytes x N / nodes x 1.5. Each rank's process (torch, CUDA, Ray) takes a few GiB more.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Optional

from simpo_ray.config import RunConfig, merged
from simpo_ray.shapes import ModelShape, PlanError, model_shape

GiB = 1024**3
# DeepSpeed's estimator multiplies host-side needs by this "additional buffer factor".
HOST_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    host_mem_gib: float = 1800.0
    runtime_gib: float = 4.0       # CUDA context + NCCL + allocator slack, per GPU
    process_host_gib: float = 4.0  # torch/CUDA/Ray per rank process, host side

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def model_state_bytes(n: int, largest: int, world: int, stage: int, dtype: str,
                      offload_optimizer: bool, offload_params: bool) -> dict:
    """Per-GPU bytes of parameters, gradients, optimizer states and the ZeRO-3 gathered
    working set (see the module docstring)."""
    if dtype == "bfloat16":
        p_b, g_b, o_b = 2, 4, 12  # bf16 weights; fp32 grads; fp32 master + Adam m, v
        g_full = 2                # ZeRO-0/1 also hold a full bf16 gradient
    else:
        p_b, g_b, o_b, g_full = 4, 4, 8, 0
    shard = lambda b: b * n / world  # noqa: E731
    if stage == 3:
        out = {"params": shard(p_b), "grads": shard(g_b), "optim": shard(o_b), "gathered": 4 * largest}
    elif stage == 2:
        out = {"params": p_b * n, "grads": shard(g_b + g_full), "optim": shard(o_b), "gathered": 0}
    elif stage == 1:
        out = {"params": p_b * n, "grads": g_full * n + shard(g_b), "optim": shard(o_b), "gathered": 0}
    else:
        out = {"params": p_b * n, "grads": (g_b + g_full) * n, "optim": o_b * n, "gathered": 0}
    if offload_optimizer:
        out["grads"] = 0 if stage == 3 else (p_b * n if stage == 2 else out["grads"] - shard(g_b))
        out["optim"] = 0
    if offload_params:
        out["params"] = 0
    return {k: int(v) for k, v in out.items()}


def host_bytes_per_node(n: int, largest: int, cluster: Cluster, stage: int, dtype: str,
                        offload_optimizer: bool, offload_params: bool) -> dict:
    gpn = cluster.gpus_per_node
    if stage == 3:  # zero.Init: each rank materializes one module at a time, in fp32
        load = largest * 4 * gpn * HOST_BUFFER_FACTOR
    else:           # every rank loads the whole model in its dtype
        load = n * (2 if dtype == "bfloat16" else 4) * gpn
    per_param = 18 if offload_params else (16 if offload_optimizer else 0)
    offload = n * per_param / cluster.nodes * HOST_BUFFER_FACTOR
    return {"load": int(load), "offload": int(offload), "processes": int(cluster.process_host_gib * GiB * gpn)}


def activation_bytes(shape: ModelShape, micro_pairs: int, seq_len: int, dtype: str, checkpointing: bool,
                     attn_implementation: str) -> int:
    a = 2 if dtype == "bfloat16" else 4
    h = shape.hidden_size
    tokens = 2 * micro_pairs * seq_len
    per_layer = tokens * (a * (4 * h + 3 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate_size) + 16 * h)
    if attn_implementation == "eager":
        score_b = 4 + 2 * a + (3 * a if shape.attn_logit_softcapping else 0)
        per_layer += 2 * micro_pairs * shape.num_heads * seq_len * seq_len * score_b
    if checkpointing:
        return shape.num_layers * tokens * h * a + per_layer + 2 * tokens * h * a
    return shape.num_layers * per_layer + 2 * tokens * h * a


def head_bytes(shape: ModelShape, micro_pairs: int, seq_len: int, dtype: str, chunk_size: int) -> int:
    a = 2 if dtype == "bfloat16" else 4
    v, h = shape.vocab_size, shape.hidden_size
    rows = 2 * micro_pairs * seq_len
    if chunk_size and not shape.final_logit_softcapping:
        if a == 2:  # a float32 slice of the weight and one of its gradient, and a float32 grad_h
            sl = min(v, _vocab_rows(shape))
            return min(chunk_size, rows) * sl * 4 + 8 * sl * h + rows * h * 4
        return min(chunk_size, rows) * v * 4 + 4 * v * h  # fp32: the weight's gradient
    soft = a if shape.final_logit_softcapping else 0
    return rows * v * (2 * a + 4 + soft) + 2 * seq_len * v * 4


def _vocab_rows(shape: ModelShape) -> int:
    from simpo_ray.logps import VOCAB_SLICE_ELEMENTS

    return VOCAB_SLICE_ELEMENTS // shape.hidden_size


def effective_chunk(cfg: RunConfig, shape: ModelShape) -> int:
    """0 when the plain head runs (chunk 0, or a soft-capped model: see policy.py)."""
    return 0 if shape.final_logit_softcapping else cfg.model.logps_chunk_size


@dataclass
class Plan:
    shape: ModelShape
    cluster: Cluster
    cfg: RunConfig
    gpu: dict      # item -> bytes per GPU
    host: dict     # item -> bytes per node

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_total <= self.cluster.gpu_mem_gib * GiB

    @property
    def fits_host(self) -> bool:
        return self.host_total <= self.cluster.host_mem_gib * GiB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.shape), "params": self.shape.params(),
                "cluster": dataclasses.asdict(self.cluster),
                "gpu_bytes": dict(self.gpu, total=self.gpu_total),
                "host_bytes_per_node": dict(self.host, total=self.host_total),
                "fits": self.fits, "fits_gpu": self.fits_gpu, "fits_host": self.fits_host}


def plan(cfg: RunConfig, cluster: Cluster, shape: Optional[ModelShape] = None) -> Plan:
    shape = shape or model_shape(cfg)
    ds, m, t = cfg.deepspeed, cfg.model, cfg.train
    n, largest = shape.params(), shape.largest_module_params()
    states = model_state_bytes(n, largest, cluster.world, ds.stage, m.dtype, ds.offload_optimizer, ds.offload_params)
    gpu = dict(states)
    gpu["activations"] = activation_bytes(shape, t.micro_batch_size, cfg.data.max_length, m.dtype,
                                          m.gradient_checkpointing, m.attn_implementation)
    gpu["logits_head"] = head_bytes(shape, t.micro_batch_size, cfg.data.max_length, m.dtype,
                                    effective_chunk(cfg, shape))
    gpu["runtime"] = int(cluster.runtime_gib * GiB)
    host = host_bytes_per_node(n, largest, cluster, ds.stage, m.dtype, ds.offload_optimizer, ds.offload_params)
    return Plan(shape, cluster, cfg, gpu, host)


def _with(cfg: RunConfig, overrides: dict) -> RunConfig:
    return RunConfig.from_dict(merged(cfg.to_dict(), overrides))


def candidate_changes(cfg: RunConfig, shape: ModelShape, cluster: Cluster):
    """Single changes, cheapest first (what each costs in speed, roughly): the head
    path, gradient checkpointing, smaller micro batches (accumulation keeps the total
    batch), ZeRO-3, optimizer offload, more nodes, parameter offload."""
    m, t, ds = cfg.model, cfg.train, cfg.deepspeed
    if not shape.final_logit_softcapping:
        yield {"model.logps_chunk_size": 0 if m.logps_chunk_size else 1024}, cluster
        if m.logps_chunk_size > 256:
            yield {"model.logps_chunk_size": 256}, cluster
    if not m.gradient_checkpointing:
        yield {"model.gradient_checkpointing": True}, cluster
    micro = t.micro_batch_size
    while micro > 1:
        micro //= 2
        yield {"train.micro_batch_size": micro}, cluster
    if ds.stage != 3:
        yield {"deepspeed.stage": 3}, cluster
    if not ds.offload_optimizer:
        yield {"deepspeed.offload_optimizer": True}, cluster
    for nodes in range(cluster.nodes + 1, 4 * cluster.nodes + 1):
        yield {}, dataclasses.replace(cluster, nodes=nodes)
    if not ds.offload_params:
        yield {"deepspeed.offload_params": True, "deepspeed.stage": 3}, cluster


def _valid(cfg: RunConfig, overrides: dict, cluster: Cluster) -> Optional[RunConfig]:
    """cfg with the overrides (train.num_workers following the cluster), or None when
    that is not a valid config (e.g. the total batch no longer divides)."""
    if cluster.world != cfg.train.num_workers and cfg.train.use_gpu:
        overrides = dict(overrides, **{"train.num_workers": cluster.world})
    try:
        return _with(cfg, overrides)
    except ValueError:
        return None


def suggest(p: Plan) -> Optional[tuple[dict, Cluster, Plan]]:
    """The first single change (cheapest first) that makes the plan fit; else the
    changes accumulated in that order (each kept only if it lowers the per-GPU total)
    up to the first combination that fits; else None."""
    for overrides, cluster in candidate_changes(p.cfg, p.shape, p.cluster):
        new = _valid(p.cfg, overrides, cluster)
        if new is not None:
            q = plan(new, cluster, p.shape)
            if q.fits:
                return overrides, cluster, q
    combined, cur = {}, p
    for overrides, cluster in candidate_changes(p.cfg, p.shape, p.cluster):
        trial = dict(combined, **overrides)
        new = _valid(p.cfg, trial, cluster)
        if new is None:
            continue
        q = plan(new, cluster, p.shape)
        if q.gpu_total < cur.gpu_total or (q.fits_gpu and not q.fits_host and cluster.nodes > cur.cluster.nodes):
            combined, cur = trial, q
        if cur.fits:
            return combined, cur.cluster, cur
    return None


def largest_micro_batch(p: Plan) -> int:
    """The largest micro batch (a divisor step of the total batch) that still fits."""
    t = p.cfg.train
    best = t.micro_batch_size
    micro = t.micro_batch_size * 2
    while t.total_batch_size % (micro * t.num_workers) == 0:
        if not plan(_with(p.cfg, {"train.micro_batch_size": micro}), p.cluster, p.shape).fits:
            break
        best, micro = micro, micro * 2
    return best


_LABELS = {
    "params": "parameters", "grads": "gradients", "optim": "optimizer states",
    "gathered": "gathered module (ZeRO-3)", "activations": "activations", "logits_head": "logits head",
    "runtime": "runtime (CUDA, NCCL, slack)",
    "load": "model loading", "offload": "offloaded states", "processes": "rank processes",
}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _gib(b: float) -> str:
    return f"{b / GiB:8.1f}"


def _describe_items(p: Plan) -> dict:
    cfg, s, c = p.cfg, p.shape, p.cluster
    ds, m = cfg.deepspeed, cfg.model
    dt = "bf16" if m.dtype == "bfloat16" else "fp32"
    shard = f"1/{c.world} shard" if ds.stage == 3 else "full copy"
    chunk = effective_chunk(cfg, s)
    seqs = 2 * cfg.train.micro_batch_size
    return {
        "params": f"{dt} weights, {shard}" + (", offloaded" if ds.offload_params else ""),
        "grads": "offloaded" if ds.offload_optimizer and ds.stage == 3 else
                 (f"fp32, 1/{c.world} shard" if ds.stage >= 2 else "full + fp32 shard"),
        "optim": "offloaded to host" if ds.offload_optimizer else
                 ("fp32 master + Adam m, v" if dt == "bf16" else "Adam m, v") + f", 1/{c.world}" * (ds.stage >= 1),
        "gathered": f"4 B x {_count(s.largest_module_params())} params" if ds.stage == 3 else "n/a",
        "activations": f"{seqs} seqs x {cfg.data.max_length} tokens, "
                       + ("checkpointed" if m.gradient_checkpointing else "no checkpointing")
                       + (", eager attention" if m.attn_implementation == "eager" else ""),
        "logits_head": (f"chunked {chunk} x vocab {s.vocab_size}"
                        + (f", bf16 head in fp32 slices of {min(s.vocab_size, _vocab_rows(s))} rows"
                           if m.dtype == "bfloat16" else "") if chunk else
                        f"plain ({seqs}, {cfg.data.max_length}, {s.vocab_size}) logits"
                        + (", soft-capped" if s.final_logit_softcapping else "")),
        "runtime": "fixed allowance",
        "load": "zero.Init: largest module per rank" if ds.stage == 3 else "whole model per rank",
        "offload": ("optimizer + weights" if ds.offload_params else "optimizer") if
                   (ds.offload_optimizer or ds.offload_params) else "none",
        "processes": f"{c.gpus_per_node} ranks x {c.process_host_gib:g} GiB",
    }


def format_plan(p: Plan, config_path: str = "") -> str:
    s, c, cfg = p.shape, p.cluster, p.cfg
    t, ds = cfg.train, cfg.deepspeed
    desc = _describe_items(p)
    lines = [f"simpo-ray plan{': ' + config_path if config_path else ''}",
             f"  model    {s.name} [{s.source}]: {_count(s.params())} parameters, {s.num_layers} layers, "
             f"hidden {s.hidden_size}, heads {s.num_heads}/{s.num_kv_heads} (q/kv), vocab {s.vocab_size}",
             f"  cluster  {c.nodes} node(s) x {c.gpus_per_node} GPUs = {c.world} ranks, {c.gpu_mem_gib:g} GiB per GPU, "
             f"{c.host_mem_gib:g} GiB host RAM per node",
             f"  run      {cfg.model.dtype}, ZeRO-{ds.stage}"
             + (", optimizer offload" if ds.offload_optimizer else "") + (", parameter offload" if ds.offload_params else "")
             + f", micro batch {t.micro_batch_size} pair{'s' * (t.micro_batch_size != 1)} x {cfg.data.max_length} tokens, "
             f"total batch "
             f"{t.total_batch_size} over {t.num_workers} workers (accumulation {t.grad_accum_steps})",
             "", "  per GPU                              GiB   how"]
    for k, v in p.gpu.items():
        lines.append(f"    {_LABELS[k]:<30}{_gib(v)}   {desc[k]}")
    verdict = "fits" if p.fits_gpu else "DOES NOT FIT"
    lines.append(f"    {'total':<30}{_gib(p.gpu_total)}   {verdict} in {c.gpu_mem_gib:g} GiB "
                 f"({(c.gpu_mem_gib * GiB - p.gpu_total) / GiB:+.1f} GiB)")
    lines += ["", "  host RAM per node                    GiB"]
    for k, v in p.host.items():
        lines.append(f"    {_LABELS[k]:<30}{_gib(v)}   {desc[k]}")
    verdict = "fits" if p.fits_host else "DOES NOT FIT"
    lines.append(f"    {'total':<30}{_gib(p.host_total)}   {verdict} in {c.host_mem_gib:g} GiB")
    lines.append("")
    if t.num_workers != c.world:
        lines.append(f"  note: train.num_workers={t.num_workers} but the cluster has {c.world} GPUs; ZeRO shards "
                     f"over the workers that run: set train.num_workers={c.world} to use them all")
    if not t.use_gpu:
        lines.append("  note: train.use_gpu is false in this config; the plan assumes one GPU per worker")
    if p.fits:
        micro = largest_micro_batch(p)
        lines.append(f"  verdict: FITS ({p.gpu_total / GiB:.1f} of {c.gpu_mem_gib:g} GiB per GPU)")
        if micro > t.micro_batch_size:
            lines.append(f"  room: train.micro_batch_size={micro} would still fit (fewer accumulation steps)")
    else:
        lines.append("  verdict: DOES NOT FIT")
        sug = suggest(p)
        if sug is None:
            lines.append("  no combination of the usual changes fits; use more GPUs or a smaller model")
        else:
            overrides, cluster, q = sug
            parts = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
            if cluster != c:
                parts.append(f"--nodes {cluster.nodes} (train.num_workers={cluster.world})")
            lines.append(f"  smallest change that fits: {' '.join(parts)} -> {q.gpu_total / GiB:.1f} GiB per GPU, "
                         f"{q.host_total / GiB:.0f} GiB host per node")
    return "\n".join(lines)


def run_plan(args) -> int:
    """CLI body: returns 0 when the plan fits, 1 when it does not."""
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    nodes = args.nodes or cfg.ray.nodes or 1
    # A CPU config (use_gpu false) is planned as one device per worker on one node.
    gpn = args.gpus_per_node or cfg.ray.gpus_per_node or (8 if cfg.train.use_gpu else cfg.train.num_workers)
    cluster = Cluster(nodes=nodes, gpus_per_node=gpn, gpu_mem_gib=args.gpu_mem_gb, host_mem_gib=args.host_mem_gb)
    try:
        p = plan(cfg, cluster)
    except PlanError as e:
        print(f"simpo-ray plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
    else:
        print(format_plan(p, args.config))
    return 0 if p.fits else 1


def add_arguments(parser) -> None:
    parser.add_argument("--nodes", type=int, help="nodes (default: ray.nodes in the config, else 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: ray.gpus_per_node, else 8)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80: H100)")
    parser.add_argument("--host-mem-gb", type=float, default=1800.0,
                        help="host RAM per node in GiB (default 1800: p5.48xlarge / a3-highgpu-8g, less headroom)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
